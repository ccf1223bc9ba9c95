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

/// Connections of their own for completions that wait for durability (`WAIT`, `WAITAOF`),
/// on one server.
///
/// The server answers nothing else on a connection while a wait there goes on, and a wait
/// counts the writes of the connection it is sent on. So a completion that waits takes a
/// connection of this pool for itself, stores the record on it, waits on it, and gives it
/// back: the store's shared connection is never held up, and the wait always covers the
/// record just written (a shared connection that reconnected in between would not).
pub(super) struct WaitPool {
    client: redis::Client,
    /// Connections back from a completion, ready for the next.
    idle: std::sync::Mutex<Vec<redis::aio::MultiplexedConnection>>,
    /// At most this many completions wait at once; the others queue for a connection.
    permits: Arc<tokio::sync::Semaphore>,
}

/// At most this many connections of a [`WaitPool`], busy or idle.
const WAIT_CONNECTIONS: usize = 16;

/// A connection of a [`WaitPool`], taken by one completion.
pub(super) struct Taken {
    pub(super) con: redis::aio::MultiplexedConnection,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl WaitPool {
    pub(super) fn new(client: redis::Client) -> Self {
        Self {
            client,
            idle: std::sync::Mutex::new(Vec::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(WAIT_CONNECTIONS)),
        }
    }

    /// A connection for one completion whose wait lasts up to `wait`: an idle one, or a
    /// new one (1 s to connect).
    pub(super) async fn take(&self, wait: std::time::Duration) -> redis::RedisResult<Taken> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed");
        // Time for the wait's own timeout, and for a command's usual bound after it.
        let answer_within = wait + std::time::Duration::from_secs(2);
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let mut con = match idle {
            Some(con) => con,
            None => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(std::time::Duration::from_secs(1)))
                    .set_response_timeout(Some(answer_within));
                self.client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?
            }
        };
        con.set_response_timeout(answer_within);
        Ok(Taken {
            con,
            _permit: permit,
        })
    }

    /// Gives back a connection that answered every command sent on it (one that failed is
    /// dropped, and closed with it).
    pub(super) fn give_back(&self, taken: Taken) {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(taken.con);
    }
}
