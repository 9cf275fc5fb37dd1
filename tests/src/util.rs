//! Small helpers shared by the harness modules: running commands, polling a
//! condition with a deadline, the suite-wide lock and environment checks
//! (the test bed's, [`testbed::util`]).

pub use testbed::util::*;
