//! What the frontends' listeners share (NBD, iSCSI and the REST API): accepting
//! connections within a global and a per-address cap, and the byte budget that bounds the
//! memory held by commands in flight and replies not yet sent.

pub mod budget;
pub mod listener;
