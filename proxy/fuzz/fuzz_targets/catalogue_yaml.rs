//! The catalogue loader, on any text an operator's file might hold: never a panic, and every
//! environment it accepts has a valid name and a well-formed `accept_env` list.
#![no_main]

use envgate_controlplane::catalogue;
use envgate_proto::names::validate_environment;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(environments) = catalogue::parse("fuzz", text) {
        for env in &environments {
            assert!(validate_environment(&env.name).is_ok(), "{:?}", env.name);
            for pattern in catalogue::accept_env(env) {
                assert!(
                    !pattern.is_empty(),
                    "an empty accept_env pattern in {:?}",
                    env.name
                );
            }
        }
    }
});
