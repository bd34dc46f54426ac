//! End to end: an environment that records sessions. The user is told; a terminal session
//! becomes an asciicast that the real `asciinema play` plays back; commands, file transfers
//! and forwardings are logged; operators list and fetch recordings through the admin API.

mod support;

use std::time::Duration;

use envgate_proto::admin::v1 as admin;
use support::{BUSYBOX_IMAGE, Fleet, Tmux, environment, eventually, run};

async fn recordings(fleet: &Fleet, user: &str) -> Vec<admin::RecordingInfo> {
    let mut client = fleet.admin_client().await.expect("admin client");
    client
        .list_recordings(fleet.authorized(admin::ListRecordingsRequest {
            user: user.to_owned(),
        }))
        .await
        .expect("ListRecordings")
        .into_inner()
        .recordings
}

async fn fetch(fleet: &Fleet, user: &str, name: &str) -> Result<Vec<u8>, tonic::Status> {
    let mut client = fleet.admin_client().await.expect("admin client");
    client
        .get_recording(fleet.authorized(admin::GetRecordingRequest {
            user: user.to_owned(),
            name: name.to_owned(),
        }))
        .await
        .map(|r| r.into_inner().content)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_sessions_are_announced_played_back_and_listed() {
    let fleet = Fleet::start().await;
    let mut exam = environment("exam", BUSYBOX_IMAGE, "/bin/sh", false);
    exam.record_sessions = true;
    fleet.put_environment(exam).await;

    // A command: the user is told, and the command is logged.
    let out = fleet.ssh("demo+exam", "echo graded", None).await;
    out.assert_success();
    assert_eq!(out.stdout, "graded\n");
    assert_eq!(out.stderr_lines(), ["envgate: this session is recorded"]);

    // A terminal session: recorded as it is seen.
    let tmux = Tmux::start(fleet.dir(), &fleet.ssh_terminal_argv("demo+exam"), 100, 30);
    tmux.type_line("echo answer-$((40+2))");
    let screen = eventually(Duration::from_secs(30), "the answer on screen", || async {
        let screen = tmux.screen();
        if screen.lines().any(|l| l.trim() == "answer-42") {
            Ok(screen)
        } else {
            Err(screen)
        }
    })
    .await;
    assert!(
        screen.contains("envgate: this session is recorded"),
        "{screen}"
    );
    tmux.type_line("exit");
    eventually(
        Duration::from_secs(30),
        "the terminal session ends",
        || async {
            let sessions = fleet.user_sessions("demo").await?;
            if sessions.is_empty() {
                Ok(())
            } else {
                Err(format!("{sessions:?}"))
            }
        },
    )
    .await;

    let listed = recordings(&fleet, "demo").await;
    let names: Vec<&str> = listed.iter().map(|r| r.name.as_str()).collect();
    let casts: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.ends_with(".cast"))
        .collect();
    assert_eq!(casts.len(), 1, "{names:?}");
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".log")).count(),
        2,
        "{names:?}"
    );

    // The cast plays back with the real asciinema, showing what the user saw.
    let cast = fetch(&fleet, "demo", casts[0]).await.expect("GetRecording");
    let file = fleet.dir().join("session.cast");
    std::fs::write(&file, &cast).unwrap();
    let played = run(
        &[
            "asciinema".to_string(),
            "play".to_string(),
            "--idle-time-limit".to_string(),
            "0.1".to_string(),
            file.display().to_string(),
        ],
        Some(b""),
        &[],
    )
    .await;
    assert_eq!(played.code, Some(0), "{played:#?}");
    assert!(played.stdout.contains("answer-42"), "{played:#?}");

    // The logs: the command as typed, and the shell.
    let mut events = Vec::new();
    for name in names.iter().filter(|n| n.ends_with(".log")) {
        let log = fetch(&fleet, "demo", name).await.expect("GetRecording");
        for line in String::from_utf8(log).unwrap().lines() {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(record["user"], "demo");
            events.push(record["event"].clone());
        }
    }
    events.sort_by_key(|e| e["kind"].as_str().unwrap_or_default().to_owned());
    assert_eq!(
        events,
        [
            serde_json::json!({"kind": "exec", "command": "echo graded"}),
            serde_json::json!({"kind": "shell"}),
        ]
    );

    // Operators name what they fetch; nothing outside the user's recordings.
    let status = fetch(&fleet, "demo", "../../controlplane.log")
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = fetch(&fleet, "demo", "0000-1.cast").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");

    // An environment that does not record leaves nothing.
    fleet.ssh("demo", "true", None).await.assert_success();
    assert_eq!(recordings(&fleet, "demo").await.len(), listed.len());
}
