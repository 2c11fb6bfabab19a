//! Crash safety of pretraining runs: `slam pretrain` killed (SIGKILL) at random moments,
//! many times, always resumes from its last complete checkpoint, never leaves a file that
//! looks complete but is not, and ends with exactly the parameters of an uninterrupted run;
//! SIGTERM stops a run cleanly after a checkpoint.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{TINY_RUN_FLAGS, arg, random_store};
use rand::{Rng, SeedableRng};
use slam_ags::checkpoint::{self, TensorFile};

/// The tiny network, with a warm-up epoch and a learning rate that moves it.
const RATE: [&str; 4] = ["--warmup-epochs", "1", "--lr", "0.05"];

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_slam"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("slam starts")
}

fn start_or_resume(store: &Path, run: &Path) -> Child {
    if run.join("config.toml").exists() {
        spawn(&["pretrain", "--resume", arg(run)])
    } else {
        let length = ["--epochs", "5", "--checkpoint-every", "2"];
        spawn(
            &[
                &["pretrain", arg(store), "--out", arg(run)][..],
                &TINY_RUN_FLAGS,
                &RATE,
                &length,
            ]
            .concat(),
        )
    }
}

/// Everything under the run's own names must be whole: checkpoints load, the config parses,
/// every metrics line but a last one cut by the kill parses.
fn check_whole(run: &Path) {
    if let Ok(text) = std::fs::read_to_string(run.join("config.toml")) {
        toml::from_str::<slam_ags::pretrain::PretrainConfig>(&text).expect("config.toml whole");
    }
    if let Ok(entries) = std::fs::read_dir(run.join("checkpoints")) {
        for entry in entries {
            let path = entry.unwrap().path();
            if path.file_name().unwrap().to_string_lossy().starts_with('.') {
                continue; // a staging folder, never read
            }
            checkpoint::load(&path.join("model.safetensors"))
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            TensorFile::open(&path.join("state.safetensors")).unwrap();
        }
    }
    if let Ok(text) = std::fs::read_to_string(run.join("metrics.jsonl")) {
        let lines: Vec<&str> = text.lines().collect();
        for line in lines.iter().take(lines.len().saturating_sub(1)) {
            serde_json::from_str::<serde_json::Value>(line).expect("a whole metrics line");
        }
    }
}

fn metrics_without_speed(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("images_per_s");
            v
        })
        .collect()
}

fn finish(child: Child) -> Output {
    child.wait_with_output().unwrap()
}

#[test]
fn killed_runs_resume_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let store = random_store(dir.path());
    let straight = dir.path().join("straight");
    let started = Instant::now();
    let out = finish(start_or_resume(&store, &straight));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let full = started.elapsed();

    let run = dir.path().join("killed");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let (mut kills, mut attempts) = (0, 0);
    // Done once the final model exists (a kill after it, while drawing the plots, leaves a
    // finished run).
    while !run.join("model.safetensors").exists() {
        attempts += 1;
        assert!(attempts < 400, "the run never finished ({kills} kills)");
        let mut child = start_or_resume(&store, &run);
        // Kill within 15% of a whole run's time: each attempt then gets a little further,
        // and over the attempts every phase is hit (start-up, steps, checkpoint writes, the
        // final model). The window widens with the attempts (doubled after 50), so that a
        // `full` measured on a quick minute of a busy machine cannot stall the run.
        let window = 0.15 * (1.0 + attempts as f64 / 50.0);
        let delay = full.mul_f64(rng.random_range(0.0..window));
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            kills += 1;
            check_whole(&run);
            continue;
        }
        let out = finish(child);
        assert!(
            out.status.success(),
            "after {kills} kills: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!("{kills} kills in {attempts} attempts; every resume continued");
    assert!(
        kills >= 5,
        "only {kills} kills: the schedule missed the runs"
    );
    let want = checkpoint::load(&straight.join("model.safetensors")).unwrap();
    let got = checkpoint::load(&run.join("model.safetensors")).unwrap();
    assert!(
        got == want,
        "the killed and resumed run ended with other parameters"
    );
    assert_eq!(
        metrics_without_speed(&run),
        metrics_without_speed(&straight)
    );
}

#[test]
fn sigterm_stops_after_a_checkpoint_and_the_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let store = random_store(dir.path());
    let run = dir.path().join("run");
    let long = [
        &TINY_RUN_FLAGS[..],
        &RATE,
        &["--epochs", "200", "--checkpoint-every", "1000"],
    ]
    .concat();
    let child = spawn(&[&["pretrain", arg(&store), "--out", arg(&run)][..], &long].concat());
    let wait_until = Instant::now() + Duration::from_secs(60);
    while !run.join("config.toml").exists() {
        assert!(Instant::now() < wait_until, "the run did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = finish(child);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("stopped on request at step"), "{err}");
    let step: u64 = err
        .split("stopped on request at step ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the step in the message");
    let checkpoint = run.join(format!("checkpoints/step-{step:08}/model.safetensors"));
    assert!(checkpoint.exists(), "no checkpoint at the stop: {err}");
    let lines = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(lines as u64, step, "metrics do not end at the stop");
    let out = finish(spawn(&[
        "pretrain",
        "--resume",
        arg(&run),
        "--max-steps",
        &(step + 2).to_string(),
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(run.join("model.safetensors").exists());
}
