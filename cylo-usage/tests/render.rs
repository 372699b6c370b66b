//! The pictures as a person sees them: a headless Chromium (Debian's `chromium`, which
//! `cargo xtask test` installs when missing and names in `CYLO_USAGE_CHROMIUM`) renders the
//! flame graph of a real tree and the timeline page (`docs/trace-preview.html`) loading its
//! trace JSON; neither may log anything to the console (an error, a failed script), and
//! neither screenshot may be blank. On the host only (the guests have no browser); in CI
//! (`CYLO_USAGE_REQUIRE_EBPF=1`) a missing browser is a failure.
#![cfg(feature = "pictures")]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{ebpf_required, host_only, tracker, workload};
use cylo_usage::{FlameWeight, ResourceUsage, RunOptions, TimelineSample};

/// The browser, or None (after saying why) where there is none and none is required.
fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("CYLO_USAGE_CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| {
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
                .map(PathBuf::from)
                .into_iter()
                .find(|p| p.is_file())
        })
        .filter(|p| p.is_file());
    if found.is_none() {
        assert!(
            !ebpf_required(),
            "CI (CYLO_USAGE_REQUIRE_EBPF=1) but no chromium: `cargo xtask test` installs it"
        );
        eprintln!("SKIPPED: no chromium (cargo xtask test installs Debian's package as root)");
    }
    found
}

/// A real tree's report with its breakdown, and timeline samples taken while it ran.
async fn real_tree() -> Option<(ResourceUsage, Vec<TimelineSample>)> {
    let t = tracker()?;
    let options = RunOptions {
        tree: true,
        ..RunOptions::default()
    };
    let mut run = t
        .spawn_with(&mut workload(&["mix", "6", "50", "100"]), options)
        .expect("spawn");
    let started = std::time::Instant::now();
    let mut samples = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), async {
        run.wait_root().await.expect("root");
        while !run.is_finished().expect("finished?") {
            if let Ok(u) = run.usage_totals() {
                samples.push(TimelineSample::of(&u, started.elapsed().as_nanos() as u64));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the tree ended within 120 s");
    let u = run.usage().expect("usage");
    assert!(u.processes.as_ref().is_some_and(|p| p.len() > 100), "{u:?}");
    Some((u, samples))
}

/// Renders `url` headless into `png` (1600 × 1000) and returns what the page logged to its
/// console.
fn render(browser: &Path, url: &str, png: &Path) -> Vec<String> {
    let _ = std::fs::remove_file(png);
    let out = Command::new(browser)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--allow-file-access-from-files",
            "--window-size=1600,1000",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--screenshot={}", png.display()))
        .arg(url)
        .env("HOME", png.parent().unwrap())
        .output()
        .expect("run chromium");
    assert!(
        png.is_file(),
        "chromium made no screenshot ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_string)
        .collect()
}

/// How much of the screenshot is drawn: the share of pixels that are not the page's
/// background (white), and how many distinct colours there are.
fn drawn(png: &Path) -> (f64, usize) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let pixels = buf[..info.buffer_size()].chunks(channels);
    let (mut inked, mut total) = (0usize, 0usize);
    let mut colours = std::collections::HashSet::new();
    for p in pixels {
        total += 1;
        if p[..3].iter().any(|&c| c < 240) {
            inked += 1;
        }
        colours.insert((p[0] >> 3, p[1] >> 3, p[2] >> 3));
    }
    (inked as f64 / total as f64, colours.len())
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cylo-usage-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_renders_the_flame_graph_and_the_timeline_of_a_real_tree() {
    if !host_only("the picture renders (no browser in the guests)") {
        return;
    }
    let Some(browser) = chromium() else { return };
    let Some((u, samples)) = real_tree().await else {
        return;
    };
    let dir = scratch("render");

    // The flame graph, as the SVG file itself.
    let svg = cylo_usage::flamegraph_svg(&u, FlameWeight::Cpu, "mix 6 50 100").unwrap();
    let svg_path = dir.join("tree.svg");
    std::fs::write(&svg_path, &svg).unwrap();
    let png = dir.join("flamegraph.png");
    let console = render(&browser, &format!("file://{}", svg_path.display()), &png);
    assert!(console.is_empty(), "the flame graph logged: {console:#?}");
    let (ink, colours) = drawn(&png);
    assert!(
        ink > 0.02 && colours > 4,
        "a blank flame graph: {ink} inked, {colours} colours"
    );

    // The timeline: the preview page with the trace JSON inlined (what `--trace` writes).
    let trace = cylo_usage::chrome_trace(&u, &samples, None);
    let page = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/trace-preview.html"),
    )
    .unwrap();
    // `</` cannot end the script early, whatever the argv in it.
    let inline = format!(
        "<script>window.TRACE = {};</script>\n<script>",
        trace.to_string().replace("</", "<\\/")
    );
    let page = page.replacen("<script>", &inline, 1);
    let html = dir.join("timeline.html");
    std::fs::write(&html, page).unwrap();
    let png = dir.join("timeline.png");
    let console = render(&browser, &format!("file://{}", html.display()), &png);
    assert!(console.is_empty(), "the timeline page logged: {console:#?}");
    let (ink, colours) = drawn(&png);
    assert!(
        ink > 0.02 && colours > 4,
        "a blank timeline: {ink} inked, {colours} colours"
    );
    if let Some(keep) = std::env::var_os("CYLO_USAGE_KEEP_PICTURES") {
        for f in [
            "flamegraph.png",
            "timeline.png",
            "tree.svg",
            "timeline.html",
        ] {
            let _ = std::fs::copy(dir.join(f), Path::new(&keep).join(f));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
