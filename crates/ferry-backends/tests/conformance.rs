//! The conformance suite, instantiated for every backend: one `#[tokio::test]` per case and
//! backend (`memory::fanout`, `nats::dead_letter_after_max_attempts`, ...).
//!
//! Service backends read `FERRY_NATS_URL`, `FERRY_REDIS_URL`, `FERRY_AMQP_URL` (defaults: the
//! local services) and `FERRY_KAFKA_URL` (Kafka runs only when it is set, with the `kafka`
//! feature). An unreachable service skips its cases with a printed reason, or fails them when
//! `FERRY_REQUIRE_SERVICES=1`.

#![allow(clippy::unwrap_used)]

mod suite;

macro_rules! conformance_suite {
    ($backend:ident) => {
        mod $backend {
            conformance_suite!(@cases $backend;
                publish_subscribe,
                publish_batch,
                fanout,
                consumer_groups,
                ordering_per_key,
                nack_redelivers,
                nack_with_delay,
                ack_timeout_redelivers,
                consumer_death_redelivers,
                dead_letter_after_max_attempts,
                dead_letter_after_timeouts,
                reject_dead_letters,
                no_loss_across_restart,
                concurrent_publishers_and_subscribers,
                close_semantics,
                wildcards,
                start_positions,
                invalid_input,
                queue_delayed_delivery,
                queue_ttl_expiry,
                queue_priority_lanes,
                queue_dedup,
                queue_retries_then_dead_letter,
                queue_permanent_failure,
                queue_redrive_and_purge,
                queue_middleware,
                queue_stats,
                publish_in_doubt
            );
        }
    };
    (@cases $backend:ident; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                crate::suite::run(
                    stringify!($case),
                    || Box::pin(crate::suite::fixtures::$backend()),
                    crate::suite::cases::$case,
                )
                .await;
            }
        )*
    };
}

conformance_suite!(memory);
/// The embedded engine over a storage whose failures a case switches on: the cases that need
/// that.
mod file_faulty {
    conformance_suite!(@cases file_faulty; publish_in_doubt);
}
conformance_suite!(file);
conformance_suite!(nats);
conformance_suite!(redis);
conformance_suite!(rabbitmq);
#[cfg(feature = "kafka")]
conformance_suite!(kafka);
