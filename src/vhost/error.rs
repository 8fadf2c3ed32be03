//! The errors of serving a device: binding its socket, setting up a connection.

use crate::sock::SocketError;
use std::io;
use thiserror::Error;
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::VhostUserHandlerError;

/// Errors setting up a socket or a connection.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// Setting up a connection failed before its frontend was accepted (out of fds, memory
    /// or threads): the frontend is still waiting in the listen queue.
    #[error("cannot set up the connection: {0}")]
    Setup(#[source] io::Error),
    #[error("vhost-user: {0}")]
    Daemon(#[source] DaemonError),
    #[error("vhost-user: the thread watching the connection panicked")]
    WatcherPanicked,
    #[error("vhost-user: the connection lost its daemon")]
    DaemonLost,
}

/// What `vhost_user_backend` reported, with its cause as the source (the library's own error
/// type does not implement `std::error::Error`). Messages are the library's.
#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("cannot create vhost user handler: {0}")]
    NewHandler(#[source] VhostUserHandlerError),
    #[error("cannot create backend listener: {0}")]
    BackendListener(#[source] VhostUserError),
    #[error("cannot create backend req handler: {0}")]
    BackendReqHandler(#[source] VhostUserError),
    #[error("cannot create vhost-user listener: {0}")]
    Listener(#[source] VhostUserError),
    #[error("failed to start daemon: {0}")]
    Start(#[source] io::Error),
    /// The library's thread panicked (its payload is dropped: it is not an error value).
    #[error("failed to wait for daemon exit")]
    Wait,
    #[error("failed to handle request: {0}")]
    Request(#[source] VhostUserError),
}

impl From<vhost_user_backend::Error> for DaemonError {
    fn from(e: vhost_user_backend::Error) -> Self {
        use vhost_user_backend::Error as E;
        match e {
            E::NewVhostUserHandler(e) => DaemonError::NewHandler(e),
            E::CreateBackendListener(e) => DaemonError::BackendListener(e),
            E::CreateBackendReqHandler(e) => DaemonError::BackendReqHandler(e),
            E::CreateVhostUserListener(e) => DaemonError::Listener(e),
            E::StartDaemon(e) => DaemonError::Start(e),
            E::WaitDaemon(_) => DaemonError::Wait,
            E::HandleRequest(e) => DaemonError::Request(e),
        }
    }
}

impl From<vhost_user_backend::Error> for ServeError {
    fn from(e: vhost_user_backend::Error) -> Self {
        ServeError::Daemon(e.into())
    }
}

impl ServeError {
    /// Whether the connection could not be set up for want of resources (fds, memory,
    /// threads), as opposed to a frontend that misbehaved or went away: the server backs off.
    pub fn is_setup(&self) -> bool {
        matches!(
            self,
            ServeError::Setup(_)
                | ServeError::Daemon(
                    DaemonError::NewHandler(_)
                        | DaemonError::BackendListener(_)
                        | DaemonError::Start(_)
                )
        )
    }

    /// Whether the frontend that made the listener readable is still in its listen queue
    /// (the failure came before it was accepted, or accepting it failed).
    pub fn left_pending(&self) -> bool {
        matches!(
            self,
            ServeError::Setup(_)
                | ServeError::Daemon(DaemonError::NewHandler(_) | DaemonError::BackendListener(_))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_errors_keep_their_cause_as_source() {
        use std::error::Error as _;
        fn shareable<T: Send + Sync + 'static>(_: &T) {}
        let broken = io::Error::from_raw_os_error(libc::EPIPE);
        let e = ServeError::from(vhost_user_backend::Error::HandleRequest(
            VhostUserError::SocketBroken(broken),
        ));
        shareable(&e);
        assert!(e
            .to_string()
            .starts_with("vhost-user: failed to handle request: "));
        assert!(!e.is_setup() && !e.left_pending());
        let daemon = e.source().expect("the library's error");
        assert!(matches!(
            daemon.downcast_ref::<DaemonError>(),
            Some(DaemonError::Request(_))
        ));
        let cause = daemon.source().expect("the protocol error");
        assert!(cause.downcast_ref::<VhostUserError>().is_some());
    }

    #[test]
    fn setup_failures_say_whether_the_frontend_is_still_queued() {
        let emfile = || io::Error::from_raw_os_error(libc::EMFILE);
        let before = ServeError::Setup(emfile());
        assert!(before.is_setup() && before.left_pending());
        let accept = ServeError::from(vhost_user_backend::Error::CreateBackendListener(
            VhostUserError::SocketError(emfile()),
        ));
        assert!(accept.is_setup() && accept.left_pending());
        let started = ServeError::from(vhost_user_backend::Error::StartDaemon(emfile()));
        assert!(started.is_setup() && !started.left_pending());
    }
}
