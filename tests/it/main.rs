//! Integration tests: the real API over HTTP, on a fresh Postgres database per test.

mod support;

mod archives;
mod bad_input;
mod cluster_view;
mod console;
mod containment;
mod coordination;
mod firing;
mod flow;
mod harness;
mod health;
mod hostile;
mod isolation;
mod notifications;
mod output;
mod retention;
mod roles;
mod run_truth;
mod secrets;
mod standalone;
mod subscriptions;
mod tokens;
mod websocket;
mod zk_acl;
mod zk_tls;
