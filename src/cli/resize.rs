//! `snapblk resize NAME [+]SIZE [--force]`: a device's size at run time.

use super::admin::call;
use super::error::CliError;
use super::output::outln;
use super::units::{human, parse_size};
use crate::control::protocol::Command;
pub use crate::cow::NewSize;
use crate::daemon_resize::ResizeOutcome;
use std::path::Path;

/// Parses `8G` (the new size) or `+1G` (grow by that much).
pub fn parse_new_size(s: &str) -> Result<NewSize, String> {
    match s.trim().strip_prefix('+') {
        Some(rest) => parse_size(rest).map(NewSize::GrowBy),
        None => parse_size(s).map(NewSize::To),
    }
}

/// `snapblk resize`.
pub fn resize(control: &Path, name: &str, size: NewSize, force: bool) -> Result<(), CliError> {
    let (size, grow_by) = match size {
        NewSize::To(s) => (Some(s), None),
        NewSize::GrowBy(n) => (None, Some(n)),
    };
    let cmd = Command::Resize {
        name: name.to_string(),
        size,
        grow_by,
        force,
    };
    let done: ResizeOutcome =
        serde_json::from_value(call(control, cmd)?).map_err(CliError::Reply)?;
    if done.old_size == done.new_size {
        outln!("{} is already {}", done.name, human(done.new_size));
        return Ok(());
    }
    outln!(
        "resized {} from {} to {} ({} bytes)",
        done.name,
        human(done.old_size),
        human(done.new_size),
        done.new_size
    );
    if done.notified {
        outln!("the connected VM was told: its disk has the new size now");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_growth() {
        assert_eq!(parse_new_size("8G"), Ok(NewSize::To(8 << 30)));
        assert_eq!(parse_new_size("+512M"), Ok(NewSize::GrowBy(512 << 20)));
        assert!(parse_new_size("+").is_err());
        assert!(parse_new_size("-1G").is_err());
        assert!(parse_new_size("0").is_err());
    }
}
