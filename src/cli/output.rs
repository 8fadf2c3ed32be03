//! What the CLI prints. A reader that stops early (`snapblk snapshot list | head`) closes the
//! pipe: the next write fails with EPIPE (the daemon ignores SIGPIPE, and so does every Rust
//! program), which must not panic as `println!` would. [`outln!`] writes a line to standard
//! output and, on a closed pipe, exits at once and quietly with status 141 (what a shell
//! reports for a program killed by SIGPIPE, so `set -o pipefail` scripts see the usual
//! status); on another write error it says so on standard error and exits with status 1.
//! [`sayln!`] is for the daemon: a closed standard output never stops it.

use std::fmt;
use std::io::{self, Write};

/// Exit status after standard output was closed by its reader: 128 + SIGPIPE.
pub const EXIT_CLOSED_PIPE: i32 = 141;

/// Writes one line to standard output, exiting as described in the module doc on failure.
pub fn out(args: fmt::Arguments<'_>) {
    let mut stdout = io::stdout().lock();
    let done = stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    if let Err(e) = done {
        exit_on_write_error(&e);
    }
}

/// Exits for a failed write to standard output: quietly on a closed pipe.
pub fn exit_on_write_error(e: &io::Error) -> ! {
    if e.kind() != io::ErrorKind::BrokenPipe {
        let _ = writeln!(io::stderr(), "snapblk: error: writing the output: {e}");
        std::process::exit(1);
    }
    std::process::exit(EXIT_CLOSED_PIPE)
}

/// Writes one line to standard output if it can; the daemon goes on either way.
pub fn say(args: fmt::Arguments<'_>) {
    let mut stdout = io::stdout().lock();
    let _ = stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
}

/// Writes one line to standard error if it can.
pub fn complain(args: fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr(), "{args}");
}

/// `println!` for the commands: a closed pipe ends the program quietly (status 141).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::output::out(format_args!($($arg)*))
    };
}

/// `println!` for the daemon: a closed standard output is ignored.
macro_rules! sayln {
    ($($arg:tt)*) => {
        $crate::cli::output::say(format_args!($($arg)*))
    };
}

/// `eprintln!` that cannot panic.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::cli::output::complain(format_args!($($arg)*))
    };
}

pub(crate) use {errln, outln, sayln};
