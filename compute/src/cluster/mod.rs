//! The compute cluster: which compute nodes are alive ([`membership`]), which of them owns
//! each queue ([`ownership`]), and how operations reach a queue's owner on another node
//! ([`peer`]: the transport; `proxy`: the local stand-in of a remote queue; `session`: the
//! owner's side of a forwarded queue; `replies`: direct replies sent to their home node).

pub mod membership;
pub mod ownership;
pub mod peer;
mod proxy;
mod replies;
mod session;
