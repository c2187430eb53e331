//! The liveness fault run (issue 11): a GitLab stand-in that holds jobs the way GitLab does
//! ([`gitlab`]), and a driver on a virtual clock that runs the real handlers against it and
//! moto under faults ([`sim`]).

pub mod gitlab;
pub mod sim;

pub use gitlab::{GitLabSim, GitLabState, Hook, SimJob, SimRunner};
pub use sim::{Faults, Leftovers, Liveness, LivenessOptions, LivenessReport};
