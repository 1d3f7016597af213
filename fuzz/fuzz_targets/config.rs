//! `config::load_str` on arbitrary UTF-8: any text is a config or a one-line
//! error naming what is wrong, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match portico::config::load_str(text, "fuzz.toml") {
        Ok(cfg) => {
            // A config that loads can be described (`portico check` prints this).
            let _ = portico::describe::describe(&cfg);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "error message spans lines: {msg:?}");
        }
    }
});
