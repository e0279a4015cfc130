//! One client connection.

pub mod frame;
