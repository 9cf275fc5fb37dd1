//! Network namespace guard and helpers to run code inside a namespace: the
//! test bed's ([`testbed::netns`]), re-exported under the suite's path.

pub use testbed::netns::*;
