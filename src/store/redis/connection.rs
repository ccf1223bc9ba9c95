//! How the store reaches Redis: one server (or a proxy), or a Redis Cluster, and where a
//! durability wait must go on a cluster.

use std::sync::Arc;

use redis::Value;
use redis::aio::ConnectionManager;

/// How the store reaches Redis: one server (or a proxy), or a Redis Cluster.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster {
        conn: redis::cluster_async::ClusterConnection,
        /// The nodes the store was given, for reading their settings.
        nodes: Arc<[String]>,
    },
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster { conn, .. } => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster { conn, .. } => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster { conn, .. } => conn.get_db(),
        }
    }
}

/// Where `WAIT` and `WAITAOF` go: they count the writes of the connection they are sent on,
/// so on a cluster they must reach the primary that holds the key just written.
pub(super) struct Waiter {
    pub(super) conn: Connection,
    pub(super) slot: u16,
}

impl redis::aio::ConnectionLike for Waiter {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match &mut self.conn {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster { conn, .. } => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::new(self.slot, SlotAddr::Master),
                ));
                Box::pin(conn.route_command(cmd.clone(), route))
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        self.conn.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (the first `{…}`
/// with something inside), or of the whole key, modulo 16384.
pub(super) fn cluster_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in tagged {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}
