//! Any bytes given to the metadata slot decoder, and any payload it accepts given to the
//! record parser: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_pool::config::DeviceMetadata;
use strata_pool::slot;

fuzz_target!(|data: &[u8]| {
    let _ = slot::decode_header(data);
    if let Ok((_, payload)) = slot::decode(data) {
        let _ = serde_json::from_slice::<DeviceMetadata>(payload);
    }
});
