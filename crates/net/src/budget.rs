//! The byte budget of commands in flight and unsent replies, per connection and per controller.
