//! The `slam` binary end to end: what it writes, and how it refuses bad input.

mod common;

use common::metrics::rel_l2_error;
use common::{
    SMALL_PLAN_FLAGS, TINY_NET_FLAGS, arg, assert_fails_with, assert_files_exist, assert_succeeds,
    slam,
};
use std::path::Path;

use slam_ags::checkpoint::TensorFile;

#[test]
fn init_writes_a_loadable_model_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let p = path.to_str().unwrap();
    let out = slam(&[
        "init",
        "--out",
        p,
        "--width",
        "4",
        "--blocks",
        "1,2,1,1",
        "--out-dim",
        "8",
        "--seed",
        "3",
    ]);
    assert_succeeds(&out);
    let state = slam_ags::checkpoint::load(&path).unwrap();
    assert_eq!(state.config.blocks, [1, 2, 1, 1]);
    assert_eq!(
        state,
        slam_ags::model::ModelState::init(state.config, 3).unwrap()
    );

    assert_fails_with(&slam(&["init", "--out", p]), &["--force"]);
    assert!(
        slam(&["init", "--out", p, "--width", "4", "--force"])
            .status
            .success()
    );
}

#[test]
fn bad_network_shapes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    let p = p.to_str().unwrap();
    assert_fails_with(
        &slam(&["init", "--out", p, "--arch", "resnet50"]),
        &["unknown architecture"],
    );
    assert_fails_with(
        &slam(&["init", "--out", p, "--blocks", "2,2,2"]),
        &["4 numbers"],
    );
    assert_fails_with(&slam(&["init", "--out", p, "--width", "0"]), &["width"]);
    assert!(!Path::new(p).exists(), "a refused run left a file behind");
}

/// Replays the first step of a PyTorch golden case through the command line.
#[test]
fn dump_step_replays_a_pytorch_step() {
    let golden = format!(
        "{}/tests/data/small_pcgrad.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump.safetensors");
    let out = slam(&[
        "dump-step",
        "--checkpoint",
        &golden,
        "--prefix",
        "before.",
        "--inputs",
        &golden,
        "--surgery",
        "pcgrad",
        "--lr",
        "0.05",
        "--out",
        dump.to_str().unwrap(),
    ]);
    assert_succeeds(&out);
    let (dump, golden) = (
        TensorFile::open(&dump).unwrap(),
        TensorFile::open(golden.as_ref()).unwrap(),
    );
    for name in ["grad.contrastive", "grad.cohesion", "grad.combined"] {
        let err = rel_l2_error(
            &dump.f32(name).unwrap().0,
            &golden.f32(&format!("step1.{name}")).unwrap().0,
        );
        assert!(err < 2e-3, "{name}: relative error {err:.2e}");
    }
    for name in ["loss.contrastive", "loss.cohesion", "input.neg_j"] {
        let err = rel_l2_error(
            &dump.f32(name).unwrap().0,
            &golden
                .f32(&format!("step1.{name}"))
                .or_else(|_| golden.f32(name))
                .unwrap()
                .0,
        );
        assert!(err < 1e-4, "{name}: relative error {err:.2e}");
    }
    let (before, after) = (
        dump.model_state("before.").unwrap(),
        dump.model_state("after.").unwrap(),
    );
    assert_eq!(before, golden.model_state("before.").unwrap());
    let want = golden.model_state("step1.after.").unwrap();
    assert!(rel_l2_error(&after.params, &want.params) < 1e-5);
    assert_eq!(after.batches_tracked, want.batches_tracked);
    assert_eq!(dump.info("step").unwrap()["surgery"], "pcgrad");
    assert_eq!(dump.info("report").unwrap()["combination"]["fired"], true);
}

#[test]
fn dump_step_on_random_inputs_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let args = |out: &str| {
        let out = dir.path().join(out);
        let out = out.to_str().unwrap().to_owned();
        let a = [&["dump-step"][..], &TINY_NET_FLAGS, &["--crop", "24"]].concat();
        slam(
            &[
                &a[..],
                &[
                    "--batch-pos",
                    "3",
                    "--batch-neg",
                    "2",
                    "--seed",
                    "5",
                    "--out",
                    &out,
                ],
            ]
            .concat(),
        )
    };
    assert!(args("a.safetensors").status.success());
    assert!(args("b.safetensors").status.success());
    let read = |n: &str| std::fs::read(dir.path().join(n)).unwrap();
    assert_eq!(
        read("a.safetensors"),
        read("b.safetensors"),
        "same seed, different dumps"
    );
    let dump = TensorFile::open(&dir.path().join("a.safetensors")).unwrap();
    assert_eq!(dump.shape("input.pos_i").unwrap(), [3, 3, 24, 24]);
    assert_eq!(dump.shape("input.neg_j").unwrap(), [2, 3, 24, 24]);
}

#[test]
fn dump_step_refuses_bad_inputs_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dump.safetensors");
    let o = out.to_str().unwrap();
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"definitely not safetensors").unwrap();
    assert_fails_with(
        &slam(&["dump-step", "--inputs", bad.to_str().unwrap(), "--out", o]),
        &["not a valid safetensors file"],
    );
    // A checkpoint is not an input batch.
    let golden = format!(
        "{}/tests/data/tiny_ags_aligned.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    assert_fails_with(
        &slam(&["dump-step", "--checkpoint", &golden, "--out", o]),
        &["encoder.0.weight"],
    );
    assert_fails_with(
        &slam(&["dump-step", "--batch-pos", "1", "--width", "4", "--out", o]),
        &["at least 2 images"],
    );
    assert_fails_with(
        &slam(&[
            "dump-step",
            "--temperature",
            "0",
            "--width",
            "4",
            "--out",
            o,
        ]),
        &["temperature"],
    );
    assert_fails_with(
        &slam(&[
            "dump-step",
            "--inputs",
            "/nonexistent/in.safetensors",
            "--out",
            o,
        ]),
        &["/nonexistent/in.safetensors"],
    );
    assert!(!out.exists(), "a refused run left a file behind");
}

#[test]
fn bench_step_runs_and_cuda_is_refused_clearly() {
    let tiny = [
        &["bench", "step"][..],
        &TINY_NET_FLAGS,
        &[
            "--crop", "32", "--batch", "8", "--steps", "2", "--warmup", "0",
        ],
    ]
    .concat();
    let out = slam(&tiny);
    assert_succeeds(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("images/s") && text.contains("AGS + SGD share"),
        "{text}"
    );
    let out = slam(&[&tiny[..], &["--json"]].concat());
    assert_succeeds(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert!(value["images_per_s"].as_f64().unwrap() > 0.0, "{value}");
    assert_eq!(value["engine"], "cpu");
    assert_fails_with(
        &slam(&[&tiny[..], &["--matmul", "tf32"]].concat()),
        &["--matmul applies to --device cuda only"],
    );
    if !common::has_cuda_driver() {
        assert_fails_with(
            &slam(&[&tiny[..], &["--device", "cuda"]].concat()),
            &["--device cuda: no CUDA driver", "use the CPU engine"],
        );
    }
}

#[test]
fn bench_embed_and_layers_report_the_cpu_and_every_layer() {
    let embed = [
        &["bench", "embed"][..],
        &TINY_NET_FLAGS,
        &["--crop", "32", "--batch", "3", "--json"],
    ]
    .concat();
    let out = slam(&[&embed[..], &["--passes", "2"]].concat());
    assert_succeeds(&out);
    let value: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("one JSON object");
    assert!(value["images_per_s"].as_f64().unwrap() > 0.0, "{value}");
    assert_eq!(value["images_per_pass"], 3);
    let header = String::from_utf8_lossy(&out.stderr);
    assert!(
        header.contains("threads of") && header.contains("products in"),
        "the header names the CPU and the SIMD level: {header}"
    );
    assert_fails_with(
        &slam(&[&embed[..], &["--passes", "0"]].concat()),
        &["--passes must be at least 1"],
    );

    // One row per distinct convolution and batch norm; the counts add up to the network's
    // layers: a stem, two convolutions per block and a downsample where the shape changes.
    let layers = [
        &["bench", "layers"][..],
        &["--width", "4", "--blocks", "1,2,1,1", "--out-dim", "8"],
        &["--crop", "32", "--batch", "2", "--runs", "1", "--json"],
    ]
    .concat();
    let out = slam(&layers);
    assert_succeeds(&out);
    let value: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("one JSON object");
    let rows = value["rows"].as_array().unwrap();
    let count = |op: &str| -> u64 {
        rows.iter()
            .filter(|r| r["op"] == op)
            .map(|r| r["count"].as_u64().unwrap())
            .sum()
    };
    let convs = 1 + 2 * 5 + 3;
    assert_eq!((count("conv"), count("bn")), (convs, convs), "{value}");
    assert!(
        rows.iter()
            .all(|r| r["forward_ms"].as_f64().unwrap() > 0.0
                && r["backward_ms"].as_f64().unwrap() > 0.0),
        "{value}"
    );
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        &names[..4],
        [
            "conv7x7/2 3->4 @32",
            "conv3x3/1 4->4 @8",
            "conv1x1/2 4->8 @8",
            "conv3x3/2 4->8 @8"
        ],
        "network order, input sides after the stem and its max pool"
    );
}

#[test]
fn inspect_describes_a_store_and_rejects_foreign_files() {
    use slam_ags::data::{BagLabel, PatchSize, StoreWriter};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.patches");
    let mut w = StoreWriter::create(&path, PatchSize::square(4)).unwrap();
    for (bag, label, truth) in [
        (
            "abnormal_a",
            BagLabel::Abnormal,
            [true, false, false, false],
        ),
        ("normal_b", BagLabel::Normal, [false; 4]),
    ] {
        w.begin_bag(bag, label).unwrap();
        for abnormal in truth {
            w.push_patch(&[abnormal as u8; 48], Some(abnormal), "")
                .unwrap();
        }
    }
    w.finish().unwrap();
    let p = path.to_str().unwrap();

    let out = slam(&["inspect", p, "--bags", "--verify"]);
    assert_succeeds(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("8 patches of 4x4 in 2 bags (1 abnormal, 1 normal)"),
        "{text}"
    );
    assert!(
        text.contains("P = 4 patches of abnormal bags, N = 4"),
        "{text}"
    );
    assert!(text.contains("witness rate 25.00%"), "{text}");
    assert!(
        text.contains("abnormal_a  abnormal        4               1"),
        "{text}"
    );

    let out = slam(&["inspect", p, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["summary"]["abnormal_instances"], 1);
    assert_eq!(json["bags"][1]["abnormal_cells"], 0);

    std::fs::write(&path, b"not a store").unwrap();
    assert_fails_with(
        &slam(&["inspect", p]),
        &["s.patches is not a usable patch store"],
    );
}

#[test]
fn demo_compares_every_variant_over_seeds_and_continues_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let demo = [
        "demo",
        "--out",
        arg(&out),
        "--compare",
        "--seeds",
        "2",
        "--patch-size",
        "24",
        "--crop",
        "16",
        "--epochs",
        "1",
        "--batch",
        "8",
        "--width",
        "4",
        "--mil-epochs",
        "3",
        "--pamil-epochs",
        "3",
        "--eval-cells",
        "12",
    ];
    let args = [&demo[..], &SMALL_PLAN_FLAGS].concat();
    let first = slam(&args);
    let text = assert_succeeds(&first);
    let variants = [
        "random-init",
        "simclr",
        "weak",
        "slam-none",
        "slam-ags",
        "slam-ags@0.1",
    ];
    for variant in variants {
        assert!(
            text.contains(&format!("| {variant} | 2 |")),
            "{variant}: {text}"
        );
        for seed in ["seed0", "seed1"] {
            let files = [
                "model.safetensors",
                "instance.json",
                "mil/metrics.json",
                "mil-pamil/metrics.json",
            ];
            assert_files_exist(&out.join("runs/w0.2").join(seed).join(variant), &files);
        }
    }
    assert!(text.contains("Paired differences against simclr"), "{text}");
    // Both MIL heads, side by side in the tables and in each run's progress lines.
    for column in ["bag AUC ABMIL", "bag AUC PAMIL", "bag F1 PAMIL"] {
        assert!(text.contains(column), "{column}: {text}");
    }
    let stderr = String::from_utf8_lossy(&first.stderr);
    for head in ["ABMIL", "PAMIL"] {
        let lines = stderr.matches(&format!("bags ({head} on z): F1 ")).count();
        assert_eq!(lines, 12, "{stderr}");
    }
    assert!(!stderr.contains("F1 n/a"), "{stderr}");
    assert!(
        text.contains("Paired differences against random-init"),
        "{text}"
    );
    assert!(
        out.join("runs/w0.2/seed0/slam-ags/run/plots/losses.png")
            .exists()
    );
    let files = [
        "results.md",
        "results.json",
        "runs.jsonl",
        "h_knn_auroc_w0.2.png",
        "bag_auc_w0.2.png",
        "pamil_auc_w0.2.png",
        "data/contact_sheet.png",
    ];
    assert_files_exist(&out, &files);
    let runs = std::fs::read_to_string(out.join("runs.jsonl")).unwrap();
    assert_eq!(runs.lines().count(), 12);
    for line in runs.lines() {
        let run: serde_json::Value = serde_json::from_str(line).unwrap();
        for key in [
            "h.knn_auroc",
            "h.centroid_auroc",
            "z.knn_auroc",
            "bag.f1",
            "pamil.f1",
        ] {
            let v = run["metrics"][key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key}: {run}"));
            assert!((0.0..=1.0).contains(&v), "{key} = {v}");
        }
    }

    // Started again, it has nothing left to run; with other settings it refuses the folder.
    let again = slam(&args);
    assert_succeeds(&again);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("12 of 12 runs were done before"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("runs.jsonl")).unwrap(),
        runs
    );
    let mut pamil_epochs = args.clone();
    let at = pamil_epochs
        .iter()
        .position(|a| *a == "--pamil-epochs")
        .unwrap();
    pamil_epochs[at + 1] = "4";
    for other in [[&args[..], &["--lr", "0.1"]].concat(), pamil_epochs] {
        assert_fails_with(&slam(&other), &["holds an experiment with other settings"]);
    }
    // The variants set the objective and surgery.
    let surgery = [&args[..], &["--surgery", "pcgrad"]].concat();
    assert_fails_with(&slam(&surgery), &["--surgery is set by each variant"]);
    // Variants that do not parse are usage errors (exit status 2), named.
    for (variant, needle) in [
        ("slam-agz", "unknown variant slam-agz"),
        ("simclr@0.1", "only the slam variants"),
    ] {
        let out = slam(&["experiment", "--out", arg(&out), "--variants", variant]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn pretrain_command_refuses_bad_settings_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::random_store(dir.path());
    let run = dir.path().join("run");
    let config = dir.path().join("run.toml");
    std::fs::write(&config, "batch = 8\nlearning_rate = 0.1\n").unwrap();
    let base = ["pretrain", arg(&store), "--out", arg(&run)];
    assert_fails_with(
        &slam(&[&base[..], &["--config", arg(&config)]].concat()),
        &["run.toml is not valid", "unknown field `learning_rate`"],
    );
    if !common::has_cuda_driver() {
        assert_fails_with(
            &slam(&[&base[..], &["--device", "cuda"]].concat()),
            &["--device cuda: no CUDA driver"],
        );
    }
    assert_fails_with(
        &slam(&[&base[..], &["--batch", "8", "--crop", "40"]].concat()),
        &["crop"],
    );
    assert!(!run.exists(), "a refused run left {}", run.display());

    let ok = [
        &base[..],
        &common::TINY_RUN_FLAGS,
        &["--epochs", "2", "--warmup-epochs", "1", "--max-steps", "2"],
    ]
    .concat();
    let text = assert_succeeds(&slam(&ok));
    assert!(text.contains("to step 2"), "{text}");
    assert_fails_with(
        &slam(&["pretrain", "--resume", arg(&run), "--lr", "0.5"]),
        &["a resumed run keeps its settings", "not --lr"],
    );
    assert_fails_with(
        &slam(&["pretrain", "--resume", arg(&run)]),
        &["already complete (2 steps)"],
    );
    let text = assert_succeeds(&slam(&[
        "pretrain",
        "--resume",
        arg(&run),
        "--max-steps",
        "3",
    ]));
    assert!(text.contains("to step 3"), "{text}");
    assert_fails_with(
        &slam(&["pretrain", "--resume", arg(&dir.path().join("none"))]),
        &["is not a pretraining run folder"],
    );
}

#[test]
fn pretrain_refuses_a_step_that_does_not_fit_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::random_store(dir.path());
    let run = dir.path().join("run");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_slam"))
        .args([
            "pretrain",
            arg(&store),
            "--out",
            arg(&run),
            "--batch",
            "8",
            "--crop",
            "12",
        ])
        .env("SLAM_MEMORY_LIMIT", "1M")
        .output()
        .unwrap();
    assert_fails_with(
        &out,
        &[
            "a training step of 8 patches (4 + 4) at crop 12",
            "GiB of memory and 0.0 GiB is available",
            "lower --batch or --crop",
        ],
    );
    assert!(!run.exists());
}

#[test]
fn bench_e2e_pretrains_on_a_synthetic_store() {
    let args = [
        "bench",
        "e2e",
        "--patch-size",
        "40",
        "--crop",
        "32",
        "--batch",
        "8",
        "--width",
        "4",
        "--blocks",
        "1,1,1,1",
        "--out-dim",
        "8",
        "--patches",
        "200",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
    ];
    let out = slam(&args);
    assert_succeeds(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert!(value["images_per_s"].as_f64().unwrap() > 0.0, "{value}");
    assert_eq!(value["images_per_step"], 16.0);
    assert_eq!(
        (&value["engine"], &value["views"]),
        (&"cpu".into(), &"host".into())
    );
    assert_fails_with(
        &slam(&[&args[..], &["--residency", "streamed"]].concat()),
        &["--views and --residency apply to --device cuda only"],
    );
}

#[test]
fn bench_kernels_without_a_gpu_fails_clearly() {
    if common::has_cuda_driver() {
        println!("skipped: this machine has a CUDA driver");
        return;
    }
    assert_fails_with(
        &slam(&["bench", "kernels", "--runs", "1"]),
        &[
            "slam bench kernels needs a CUDA GPU",
            "libcuda.so",
            "CPU engine",
        ],
    );
}
