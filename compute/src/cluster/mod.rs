//! The compute cluster: which compute nodes are alive ([`membership`]), which of them owns
//! each queue ([`ownership`]), and how operations reach a queue's owner on another node
//! ([`peer`]).

pub mod membership;
pub mod ownership;
pub mod peer;
