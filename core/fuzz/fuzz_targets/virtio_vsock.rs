//! virtio-vsock: guest packets on the TX queue (headers, operations,
//! credit, connection requests towards host sockets that do not exist),
//! replies into RX buffers and the event queue, over an arbitrary guest RAM
//! image and queue state.
#![no_main]

use std::os::unix::net::UnixListener;
use std::sync::{Arc, OnceLock};

use denovisor_core::virtio::vsock::muxer::{Muxer, Stats};
use denovisor_core::virtio::vsock::Engine;
use denovisor_core::virtio::worker::Wake;
use denovisor_fuzz::{acceptable, fuzz_target, load_image, queue, ram, Input, QUEUE_HEADER};

/// The host socket the device listens on (no host peer ever connects).
fn listener() -> &'static (UnixListener, String) {
    static LISTENER: OnceLock<(UnixListener, String)> = OnceLock::new();
    LISTENER.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("denovisor-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).expect("binding the fuzz vsock socket");
        let _ = std::fs::remove_file(&path);
        (l, path.display().to_string())
    })
}

fuzz_target!(|data| {
    let (l, path) = listener();
    let mut input = Input::new(data);
    let kicks = input.u8();
    let mut header = Input::new(input.bytes(3 * QUEUE_HEADER));
    let mem = ram();
    load_image(&mem, input.rest());
    let (Some(rx), Some(tx)) = (queue(&mut header, 0, 256), queue(&mut header, 1, 256)) else {
        return;
    };
    let event = queue(&mut header, 2, 256);
    let mut all = vec![&rx, &tx];
    all.extend(event.as_ref());
    if !acceptable(&all) {
        return;
    }
    let Ok(muxer) = Muxer::new(
        3,
        path.clone(),
        l.try_clone().unwrap(),
        Arc::new(Stats::default()),
    ) else {
        return;
    };
    let mut engine = Engine::new(mem, rx, tx, event, muxer);
    let mut notify = |_q: usize| {};
    for i in 0..=(kicks % 4) {
        let result = if kicks & 0x80 != 0 && i == 1 {
            engine.transport_reset(&mut notify).map(|_| ())
        } else {
            engine.handle(Wake::Kick((i % 2) as usize), &mut notify)
        };
        if result.is_err() {
            break;
        }
    }
});
