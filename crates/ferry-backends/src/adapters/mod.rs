//! The adapters, one module per backend.

pub mod embedded;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod nats;
pub mod rabbitmq;
pub mod redis;
