//! Arbitrary octets through the AMQP frame decoder and content assembler: never a panic,
//! and the invariants in `common/frame_decoder.rs` hold.
#![no_main]

#[path = "../common/frame_decoder.rs"]
mod frame_decoder;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = frame_decoder::run(data);
});
