//! The PROXY v2 header, the first bytes any TCP peer of a proxy sends: never a panic, and the
//! buffered parser (`parse`) and the streaming one (`read_header`, what the proxy runs) agree
//! on every input.
#![no_main]

use std::sync::LazyLock;

use envgate_proxy::proxy_protocol::{looks_like_proxy_header, parse, read_header};
use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;

static RT: LazyLock<Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
});

fuzz_target!(|data: &[u8]| {
    let _ = looks_like_proxy_header(data);
    let parsed = parse(data);
    if let Ok((_, used)) = &parsed {
        assert!(
            *used <= data.len(),
            "parse used {used} of {} bytes",
            data.len()
        );
    }
    let streamed = RT.block_on(read_header(&mut &data[..]));
    match (parsed, streamed) {
        (Ok((buffered, _)), Ok(streamed)) => assert_eq!(buffered, streamed),
        (Err(_), Err(_)) => {}
        (buffered, streamed) => panic!("parse: {buffered:?}, read_header: {streamed:?}"),
    }
});
