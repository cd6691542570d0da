//! Accepting connections within a global and a per-client-address cap.
