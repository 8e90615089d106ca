//! The platform's tasks. For now the built-in `bench` set: small tasks with an exact contract, for tests,
//! benchmarks and smoke checks of a deployment (the same names `../shared/bench` drives).
//!
//! # Layout
//! - [`bench`]: `bench.noop`, `bench.add`, `bench.echo`, `bench.sleep`, `bench.xsum`, `bench.mark`,
//!   `bench.fail`, `bench.panic`, `bench.flaky`, `bench.slow`, `bench.progress`, `bench.mul`.

pub mod bench;
