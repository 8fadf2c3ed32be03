//! The metadata contexts an export offers, by name, and which of them a query lists
//! (`NBD_OPT_LIST_META_CONTEXT`) or selects (`NBD_OPT_SET_META_CONTEXT`). Pure.
//!
//! - `base:allocation`: holes and zeros (the NBD standard's one context);
//! - `qemu:allocation-depth`: which layer of the device's chain provides each extent;
//! - `qemu:dirty-bitmap:NAME`: the extents where the export differs from device `NAME`.
//!
//! Queries: an exact name selects or lists that context; for listing only, `base:` lists
//! `base:allocation`, `qemu:` every `qemu:` context and `qemu:dirty-bitmap:` every dirty
//! bitmap. A query of another namespace selects nothing (the protocol says to ignore it).

pub const BASE_ALLOCATION: &str = "base:allocation";
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
pub const DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

/// A metadata context.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Context {
    Allocation,
    Depth,
    /// The extents where the export differs from this device.
    Dirty(String),
}

impl Context {
    /// The context's name on the wire.
    pub fn name(&self) -> String {
        match self {
            Context::Allocation => BASE_ALLOCATION.to_string(),
            Context::Depth => ALLOCATION_DEPTH.to_string(),
            Context::Dirty(dev) => format!("{DIRTY_BITMAP}{dev}"),
        }
    }
}

/// Every context an export offers, dirty bitmaps against `devices`.
pub fn all(devices: &[String]) -> Vec<Context> {
    let mut v = vec![Context::Allocation, Context::Depth];
    v.extend(devices.iter().cloned().map(Context::Dirty));
    v
}

/// The context `query` names exactly, if it exists: what `NBD_OPT_SET_META_CONTEXT` selects.
pub fn select(query: &str, devices: &[String]) -> Option<Context> {
    match query {
        BASE_ALLOCATION => Some(Context::Allocation),
        ALLOCATION_DEPTH => Some(Context::Depth),
        q => q
            .strip_prefix(DIRTY_BITMAP)
            .filter(|dev| !dev.is_empty() && devices.iter().any(|d| d == dev))
            .map(|dev| Context::Dirty(dev.to_string())),
    }
}

/// The contexts `query` lists: its exact context, or the ones its wildcard covers.
pub fn list(query: &str, devices: &[String]) -> Vec<Context> {
    match query {
        "base:" => vec![Context::Allocation],
        "qemu:" => all(devices).split_off(1),
        DIRTY_BITMAP => all(devices).split_off(2),
        q => select(q, devices).into_iter().collect(),
    }
}

/// Whether `query` is well formed: a non-empty namespace, then a colon.
pub fn well_formed(query: &str) -> bool {
    query.find(':').is_some_and(|i| i > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_list_and_select_what_they_name() {
        let devs = vec!["origin".to_string(), "snap 1".to_string()];
        assert_eq!(
            all(&devs).iter().map(Context::name).collect::<Vec<_>>(),
            [
                "base:allocation",
                "qemu:allocation-depth",
                "qemu:dirty-bitmap:origin",
                "qemu:dirty-bitmap:snap 1"
            ]
        );
        assert_eq!(list("base:", &devs), vec![Context::Allocation]);
        assert_eq!(list("qemu:", &devs).len(), 3);
        assert_eq!(list("qemu:dirty-bitmap:", &devs).len(), 2);
        assert_eq!(list("x-other:thing", &devs), vec![]);
        assert_eq!(select("base:", &devs), None, "a wildcard selects nothing");
        assert_eq!(select("qemu:dirty-bitmap:", &devs), None);
        assert_eq!(
            select("qemu:dirty-bitmap:snap 1", &devs),
            Some(Context::Dirty("snap 1".into()))
        );
        assert_eq!(select("qemu:dirty-bitmap:gone", &devs), None);
        assert!(well_formed("base:") && !well_formed(":x") && !well_formed("nocolon"));
    }
}
