//! Any bytes given to the label decoder: an error or a label, never a panic; a decoded
//! label re-encodes to a copy that decodes to the same label.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_pool::label::Label;

fuzz_target!(|data: &[u8]| {
    if let Ok(label) = Label::decode(data) {
        assert_eq!(Label::decode(&label.encode(0)).unwrap(), label);
    }
});
