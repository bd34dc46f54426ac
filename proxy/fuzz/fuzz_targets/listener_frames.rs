//! The frames between `envgate-agent listen` and the proxy (`-R` forwarding): the agent reads
//! them whole from a stream (`Frame::read`), the proxy from chunks as they arrive
//! (`FrameBuffer`). Never a panic, and both decoders see the same frames on the same bytes,
//! however the bytes are cut.
#![no_main]

use std::sync::LazyLock;

use envgate_agent::mux::{Frame, FrameBuffer};
use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;

static RT: LazyLock<Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
});

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let whole = RT.block_on(async {
        let mut input = stream;
        let mut frames = Vec::new();
        let end = loop {
            match Frame::read(&mut input).await {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break true,
                Err(_) => break false,
            }
        };
        (frames, end)
    });
    let mut buffer = FrameBuffer::default();
    let mut chunked = Vec::new();
    let mut failed = false;
    'chunks: for chunk in stream.chunks(usize::from(cut).max(1)) {
        buffer.push(chunk);
        loop {
            match buffer.next_frame() {
                Ok(Some(frame)) => chunked.push(frame),
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break 'chunks;
                }
            }
        }
    }
    assert_eq!(whole.0, chunked, "the two decoders disagree");
    // A stream that ended cleanly between frames left nothing half-read on the proxy's side.
    if whole.1 {
        assert!(!failed);
    }
});
