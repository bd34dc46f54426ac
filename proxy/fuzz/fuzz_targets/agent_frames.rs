//! The agent protocol's frames, as each side reads the other's: the agent reads the proxy's
//! (with the small frame limit before the handshake, the full one after), the proxy reads the
//! agent's. Never a panic, always an end (the input is finite), and every message decoded
//! encodes to a frame that decodes to the same message.
#![no_main]

use std::sync::LazyLock;

use envgate_agent::protocol::FrameReader;
use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;

static RT: LazyLock<Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    RT.block_on(async {
        let mut reader = FrameReader::new(stream);
        if mode & 1 == 0 {
            // The agent before a proxy authenticated (server.rs).
            reader.set_max_frame(256);
        }
        while let Ok(Some((channel, message))) = reader.next().await {
            let mut wire = Vec::new();
            message.encode(channel, &mut wire);
            match FrameReader::new(&wire[..]).next().await {
                Ok(Some(again)) => assert_eq!(again, (channel, message)),
                other => panic!("{message:?} on channel {channel} encoded to {wire:?}: {other:?}"),
            }
        }
    });
});
