//! `--flamegraph`: the flame graph of real trees, drawn from the breakdown the tracker made:
//! valid XML, one frame per distinct stack prefix of the tree, as wide as the figures.
#![cfg(feature = "pictures")]
mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::{WORKLOAD, tracker, workload};
use cylo_usage::{
    FlameWeight, FlamegraphError, Precision, ResourceUsage, RunOptions, flamegraph_svg,
    folded_stacks,
};

/// Runs `cmd` to its end with a breakdown; returns the report.
async fn run_tree(cmd: &mut Command) -> Option<ResourceUsage> {
    let t = tracker()?;
    let options = RunOptions {
        tree: true,
        ..Default::default()
    };
    let mut run = t.spawn_with(cmd, options).expect("spawn under the tracker");
    tokio::time::timeout(Duration::from_secs(120), async {
        let status = run.wait_root().await.expect("wait for the root");
        assert!(status.success(), "{status:?}");
        run.wait_finished().await.expect("wait for the tree");
    })
    .await
    .expect("the run finished within 120 s");
    let u = run.usage().expect("usage");
    assert_eq!(u.precision, Precision::Exact, "{u:?}");
    assert_eq!(u.lost_events, 0, "{u:?}");
    Some(u)
}

/// The frames a flame graph of `folded` must hold: one per distinct stack prefix, as (its
/// last name, the sum of the stacks it prefixes), and the root "all" frame with the total.
fn expected_frames(folded: &[(String, u64)]) -> BTreeMap<(String, u64), usize> {
    let mut prefixes: BTreeMap<Vec<&str>, u64> = BTreeMap::new();
    for (stack, w) in folded {
        let names: Vec<&str> = stack.split(';').collect();
        for len in 1..=names.len() {
            *prefixes.entry(names[..len].to_vec()).or_insert(0) += w;
        }
    }
    let mut frames = BTreeMap::new();
    for (prefix, w) in prefixes {
        *frames
            .entry((prefix.last().unwrap().to_string(), w))
            .or_insert(0) += 1;
    }
    let total = folded.iter().map(|(_, w)| w).sum::<u64>();
    *frames.entry(("all".to_string(), total)).or_insert(0) += 1;
    frames
}

/// The frames of an SVG (each `<g>` with a `<title>` in inferno's `<svg id="frames">`), as
/// (name, `fg:w`), counted. Panics unless the SVG parses as XML.
fn svg_frames(svg: &[u8]) -> BTreeMap<(String, u64), usize> {
    let text = std::str::from_utf8(svg).expect("the SVG is UTF-8");
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(text, options).expect("the SVG is XML");
    let container = doc
        .descendants()
        .find(|n| n.has_tag_name("svg") && n.attribute("id") == Some("frames"))
        .expect("inferno's frames container");
    let mut frames = BTreeMap::new();
    for g in container.children().filter(|n| n.has_tag_name("g")) {
        let title = g
            .children()
            .find(|n| n.has_tag_name("title"))
            .and_then(|t| t.text())
            .expect("each frame has a title");
        let width: u64 = g
            .children()
            .find(|n| n.has_tag_name("rect"))
            .and_then(|r| r.attribute(("http://github.com/jonhoo/inferno", "w")))
            .expect("each frame has its width, fg:w")
            .parse()
            .unwrap();
        let (name, _) = title.rsplit_once(" (").expect("name (figure unit, share)");
        *frames.entry((name.to_string(), width)).or_insert(0) += 1;
    }
    frames
}

/// The SVG of `u` for `weight` holds one frame per distinct stack prefix of its folded
/// stacks, and those sum to the processes' own figures.
fn check(u: &ResourceUsage, weight: FlameWeight) -> Vec<u8> {
    let processes = u.processes.as_deref().expect("a breakdown");
    let folded = folded_stacks(u, weight);
    let own: u64 = processes.iter().filter_map(|p| weight.of(p)).sum();
    assert_eq!(folded.iter().map(|(_, w)| w).sum::<u64>(), own, "{weight}");
    let svg = flamegraph_svg(u, weight, "cylo-usage: a real tree").expect("an SVG");
    assert_eq!(svg_frames(&svg), expected_frames(&folded), "{weight}");
    svg
}

#[tokio::test]
async fn the_flame_graph_of_a_real_tree_has_a_frame_per_distinct_stack() {
    let Some(u) = run_tree(&mut workload(&["mix", "6", "50", "100"])).await else {
        return;
    };
    let processes = u.processes.as_deref().expect("a breakdown");
    assert_eq!(processes.len(), 107, "{u:?}");
    let svg = check(&u, FlameWeight::Cpu);
    // Each process's CPU, as the breakdown adds up to the totals.
    let folded = folded_stacks(&u, FlameWeight::Cpu);
    assert_eq!(
        folded.iter().map(|(_, w)| w).sum::<u64>(),
        u.cpu_time_ns,
        "{u:?}"
    );
    // The root, and its 106 children (forks that never exec'd) merged into one stack.
    // A last word that is a number is kept a name by a zero-width space.
    let root = "cylo-usage-workload mix 6 50 100\u{200b}";
    let child = format!("{root};[{}]", processes[1].comm);
    let stacks: Vec<&str> = folded.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(stacks, [root, child.as_str()], "{u:?}");
    assert_eq!(folded[0].1, processes[0].cpu_time_ns);
    eprintln!(
        "the flame graph of {} processes: {} bytes, {} stacks",
        processes.len(),
        svg.len(),
        folded.len()
    );
    // Disk is measured here (0 or more), and memory where the kernel measures it (not
    // before 5.12: then it is an error naming that, never an empty picture), the network too
    // (not on arm64 before 6.3); the network of a tree that used none is an error too.
    for weight in [FlameWeight::Disk, FlameWeight::Memory, FlameWeight::Network] {
        let unmeasured = match weight {
            FlameWeight::Memory => u.peak_memory_bytes.is_none(),
            FlameWeight::Network => !common::network_hooks(),
            _ => false,
        };
        match flamegraph_svg(&u, weight, "t") {
            Ok(_) if !unmeasured => {
                check(&u, weight);
            }
            Err(FlamegraphError::Nothing { processes: 107, .. }) if !unmeasured => {
                assert!(folded_stacks(&u, weight).is_empty())
            }
            Err(FlamegraphError::Unmeasured { .. }) if unmeasured => {}
            other => panic!("{weight}: {:?}", other.map(|svg| svg.len())),
        }
    }
}

#[tokio::test]
async fn the_flame_graph_of_a_shell_tree_stacks_commands_on_their_parents() {
    let script = format!(
        "/bin/true; {WORKLOAD} mix 2 20 3 & {WORKLOAD} mix 2 20 3; (/bin/true; {WORKLOAD} \
         mix 1 20 1); wait"
    );
    let Some(u) = run_tree(Command::new("/bin/sh").args(["-c", &script])).await else {
        return;
    };
    let svg = check(&u, FlameWeight::Cpu);
    let folded = folded_stacks(&u, FlameWeight::Cpu);
    let stacks: Vec<&str> = folded.iter().map(|(s, _)| s.as_str()).collect();
    // The two `mix 2 20 3` under the shell merged into one stack (and their children into
    // another); the subshell's `mix 1 20 1` under it (the subshell itself where it exec'd its
    // last command, as dash does).
    let root = stacks[0];
    assert!(root.starts_with("sh -c /bin/true\\u{3b} "), "{stacks:?}");
    let mix = format!("{root};cylo-usage-workload mix 2 20 3\u{200b}");
    let line = folded.iter().find(|(s, _)| *s == mix).expect("mix 2 20 3");
    let processes = u.processes.as_deref().unwrap();
    let mixes: Vec<u64> = processes
        .iter()
        .filter(|p| {
            p.argv
                .as_ref()
                .is_some_and(|a| a.ends_with(&["3".to_string()]))
        })
        .map(|p| p.cpu_time_ns)
        .collect();
    assert_eq!(mixes.len(), 2, "{u:?}");
    assert_eq!(line.1, mixes.iter().sum::<u64>());
    assert!(
        stacks.contains(&format!("{root};true").as_str()),
        "{stacks:?}"
    );
    assert!(
        // The kernel keeps 15 bytes of a comm.
        stacks.contains(&format!("{mix};[cylo-usage-work]").as_str()),
        "{stacks:?}"
    );
    assert!(
        stacks
            .iter()
            .any(|s| s.ends_with(";cylo-usage-workload mix 1 20 1\u{200b}")),
        "{stacks:?}"
    );
    eprintln!("{} stacks, {} bytes: {stacks:#?}", folded.len(), svg.len());
}
