//! Integration tests of the saga library against the real PostgreSQL and
//! RabbitMQ (each test: its own database, exchange and queues).

mod batches;
mod broker;
mod engine;
mod harness;
mod helpers;
mod operator;
mod races;
mod resilience;
mod retries;
