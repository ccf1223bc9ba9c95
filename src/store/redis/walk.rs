//! `list` and `vacuum` on Redis: a walk over the store's keys with `SCAN`, on a single
//! server or on every primary of a cluster, apart from the request path's scripts.

use redis::Value;

use super::connection::Connection;
use super::scripts::SCRIPTS;
use super::{RedisStore, parse_inspect};
use crate::key::StoreKey;
use crate::store::{Cursor, KeyState, ListFilter, ListPage, ListedKey, StoreError, VacuumPage};

/// `text` with the glob characters of `SCAN … MATCH` escaped.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A walk's position: which primary (always 0 on a single server) and its `SCAN` cursor.
fn parse_cursor(cursor: Option<&Cursor>) -> Result<(usize, u64), StoreError> {
    let Some(cursor) = cursor else {
        return Ok((0, 0));
    };
    cursor
        .as_str()
        .split_once(':')
        .and_then(|(node, scan)| Some((node.parse().ok()?, scan.parse().ok()?)))
        .ok_or_else(|| StoreError::backend(BadCursor(cursor.as_str().to_owned())))
}

/// A cursor this store did not make.
#[derive(Debug, thiserror::Error)]
#[error("not a Redis walk cursor: {0:?} (expected NODE:SCAN)")]
struct BadCursor(String);

impl RedisStore {
    /// The key a Redis key holds, if it is one of this store's.
    fn store_key_of(&self, redis_key: &[u8]) -> Option<StoreKey> {
        let text = std::str::from_utf8(redis_key).ok()?;
        let mut rest = text.strip_prefix(&*self.prefix)?;
        if matches!(self.conn, Connection::Cluster { .. }) {
            // `{16 hex digits}` of the store's own hash tag.
            let tag = rest.get(..18)?;
            if !(tag.starts_with('{') && tag.ends_with('}')) {
                return None;
            }
            rest = &rest[18..];
        }
        StoreKey::from_stored(rest)
    }

    /// The first slot of each primary of the cluster, in slot order (one entry, slot 0, on
    /// a single server): where each leg of a walk sends its `SCAN`.
    async fn primaries(&self) -> Result<Vec<u16>, StoreError> {
        let Connection::Cluster { .. } = &self.conn else {
            return Ok(vec![0]);
        };
        let mut con = self.conn.clone();
        let reply: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut con)
            .await
            .map_err(StoreError::backend)?;
        let Value::Array(ranges) = reply else {
            return Err(super::damaged("CLUSTER SLOTS reply"));
        };
        // (first slot, primary's address) per range; a primary may serve several ranges.
        let mut firsts: Vec<(u16, Vec<Value>)> = Vec::new();
        for range in ranges {
            let Value::Array(parts) = range else {
                return Err(super::damaged("CLUSTER SLOTS range"));
            };
            let (Some(Value::Int(start)), Some(Value::Array(primary))) =
                (parts.first(), parts.get(2))
            else {
                return Err(super::damaged("CLUSTER SLOTS range"));
            };
            // [host, port, id, …]: a primary is its host and port.
            let address: Vec<Value> = primary.iter().take(2).cloned().collect();
            let start = u16::try_from(*start).map_err(|_| super::damaged("CLUSTER SLOTS slot"))?;
            match firsts.iter_mut().find(|(_, a)| *a == address) {
                Some(known) => known.0 = known.0.min(start),
                None => firsts.push((start, address)),
            }
        }
        let mut slots: Vec<u16> = firsts.into_iter().map(|(s, _)| s).collect();
        slots.sort_unstable();
        Ok(slots)
    }

    /// One `SCAN` step from `cursor`: the keys it returned and where the walk goes on.
    async fn scan_step(
        &self,
        cursor: Option<&Cursor>,
        count: usize,
    ) -> Result<(Vec<Vec<u8>>, Option<Cursor>), StoreError> {
        let (node, scan) = parse_cursor(cursor)?;
        let primaries = self.primaries().await?;
        let Some(&slot) = primaries.get(node) else {
            return Ok((Vec::new(), None));
        };
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(scan)
            .arg("MATCH")
            .arg(format!("{}*", glob_escape(&self.prefix)))
            .arg("COUNT")
            .arg(count.max(1));
        let reply: Value = match &self.conn {
            Connection::Single(manager) => {
                let mut con = manager.clone();
                cmd.query_async(&mut con)
                    .await
                    .map_err(StoreError::backend)?
            }
            Connection::Cluster { conn, .. } => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::new(slot, SlotAddr::Master),
                ));
                conn.clone()
                    .route_command(cmd, route)
                    .await
                    .map_err(StoreError::backend)?
            }
        };
        let (next_scan, keys): (u64, Vec<Vec<u8>>) =
            redis::FromRedisValue::from_redis_value(reply).map_err(StoreError::backend)?;
        let next = if next_scan != 0 {
            Some(Cursor::new(format!("{node}:{next_scan}")))
        } else if node + 1 < primaries.len() {
            Some(Cursor::new(format!("{}:0", node + 1)))
        } else {
            None
        };
        Ok((keys, next))
    }

    /// What `redis_key` holds, read with the inspect script (the same reading as
    /// [`inspect`](crate::store::IdempotencyStore::inspect)).
    async fn state_of(&self, redis_key: &[u8]) -> Result<KeyState, StoreError> {
        let mut con = self.conn.clone();
        let reply: Value = SCRIPTS
            .inspect
            .key(redis_key)
            .invoke_async(&mut con)
            .await
            .map_err(StoreError::backend)?;
        parse_inspect(reply)
    }

    pub(super) async fn list_page(
        &self,
        filter: &ListFilter,
        cursor: Option<&Cursor>,
    ) -> Result<ListPage, StoreError> {
        let (keys, next) = self
            .scan_step(cursor, filter.page_size_or_default())
            .await?;
        let scanned = keys.len() as u64;
        let mut entries = Vec::new();
        let mut unreadable = Vec::new();
        for redis_key in keys {
            let Some(key) = self.store_key_of(&redis_key) else {
                continue;
            };
            match self.state_of(&redis_key).await {
                Ok(state) if filter.matches(&state) => entries.push(ListedKey::new(key, state)),
                Ok(_) => {}
                Err(StoreError::Decode(_)) => unreadable.push(key),
                Err(err) => return Err(err),
            }
        }
        Ok(ListPage::new(entries, scanned, next).with_unreadable(unreadable))
    }

    /// Redis removes an entry itself when its `PX` ends, which is when the other stores'
    /// sweeps would (a record's TTL, a committed key's TTL, a claim's lease plus
    /// [`ORPHAN_RETENTION`](crate::store::ORPHAN_RETENTION)), and never shows an expired
    /// key. So vacuuming walks the keys with `SCAN` (which makes Redis reclaim at once any
    /// expired key the walk passes) and removes nothing itself.
    pub(super) async fn vacuum_step(
        &self,
        cursor: Option<&Cursor>,
        batch: usize,
    ) -> Result<VacuumPage, StoreError> {
        let (keys, next) = self.scan_step(cursor, batch).await?;
        Ok(VacuumPage::new(0, keys.len() as u64, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_of_a_prefix_are_escaped() {
        assert_eq!(glob_escape("idempotency:"), "idempotency:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn walk_cursors_round_trip_and_bad_ones_are_refused() {
        assert_eq!(parse_cursor(None).unwrap(), (0, 0));
        assert_eq!(
            parse_cursor(Some(&Cursor::new("2:1234"))).unwrap(),
            (2, 1234)
        );
        assert!(parse_cursor(Some(&Cursor::new("anon:k"))).is_err());
        assert!(parse_cursor(Some(&Cursor::new("x"))).is_err());
    }
}
