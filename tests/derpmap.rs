//! `derp-relay derpmap`, run as an operator runs it: the real binary, its
//! output read back the way Tailscale and headscale read it. The JSON is
//! parsed into structs that mirror `tailcfg.DERPMap` (PROTOCOL.md §11) and the
//! YAML into structs that mirror headscale's `derp-example.yaml`, both refusing
//! unknown fields: a misspelt or unexpected field fails the test, as it would
//! silently fail a client. Fields Go marks `omitempty` are `Option`s here, so
//! the tests also see what is left out.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde::Deserialize;

// ------------------------------------------------------------ Tailscale JSON (§11)

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct DerpMap {
    #[serde(rename = "Regions")]
    regions: BTreeMap<String, Region>,
    #[serde(rename = "omitDefaultRegions")]
    omit_default_regions: Option<bool>,
    #[serde(rename = "HomeParams")]
    home_params: Option<serde_json::Value>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Region {
    #[serde(rename = "RegionID")]
    region_id: u32,
    #[serde(rename = "RegionCode")]
    region_code: String,
    #[serde(rename = "RegionName")]
    region_name: String,
    #[serde(rename = "Latitude")]
    latitude: Option<f64>,
    #[serde(rename = "Longitude")]
    longitude: Option<f64>,
    #[serde(rename = "NoMeasureNoHome")]
    no_measure_no_home: Option<bool>,
    #[serde(rename = "Avoid")]
    avoid: Option<bool>,
    #[serde(rename = "Nodes")]
    nodes: Vec<Node>,
}

#[derive(Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
struct Node {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "RegionID")]
    region_id: u32,
    #[serde(rename = "HostName")]
    host_name: String,
    #[serde(rename = "CertName")]
    cert_name: Option<String>,
    #[serde(rename = "IPv4")]
    ipv4: Option<String>,
    #[serde(rename = "IPv6")]
    ipv6: Option<String>,
    #[serde(rename = "STUNPort")]
    stun_port: Option<i32>,
    #[serde(rename = "STUNOnly")]
    stun_only: Option<bool>,
    #[serde(rename = "DERPPort")]
    derp_port: Option<u16>,
    #[serde(rename = "CanPort80")]
    can_port_80: Option<bool>,
    #[serde(rename = "InsecureForTests")]
    insecure_for_tests: Option<bool>,
    #[serde(rename = "STUNTestIP")]
    stun_test_ip: Option<String>,
}

impl Node {
    /// The node a flag-less run prints for `host` in region 900.
    fn plain(name: &str, region_id: u32, host: &str) -> Node {
        Node {
            name: name.into(),
            region_id,
            host_name: host.into(),
            cert_name: None,
            ipv4: None,
            ipv6: None,
            stun_port: Some(3478),
            stun_only: None,
            derp_port: Some(443),
            can_port_80: None,
            insecure_for_tests: None,
            stun_test_ip: None,
        }
    }
}

// ------------------------------------------------------------ headscale YAML

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct HsMap {
    regions: BTreeMap<u32, HsRegion>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct HsRegion {
    regionid: u32,
    regioncode: String,
    regionname: String,
    latitude: Option<f64>,
    longitude: Option<f64>,
    nomeasurenohome: Option<bool>,
    nodes: Vec<HsNode>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct HsNode {
    name: String,
    regionid: u32,
    hostname: String,
    certname: Option<String>,
    ipv4: Option<String>,
    ipv6: Option<String>,
    stunport: i32,
    stunonly: bool,
    derpport: u16,
    canport80: Option<bool>,
    insecurefortests: Option<bool>,
}

// ------------------------------------------------------------ running it

fn run(args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_derp-relay"));
    for (k, _) in std::env::vars() {
        if k.starts_with("DERP_RELAY_") {
            c.env_remove(k);
        }
    }
    c.arg("derpmap")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run derp-relay")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn success(o: &Output) -> String {
    assert!(
        o.status.success(),
        "expected success; stderr: {}",
        stderr(o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A failure: non-zero exit, nothing on stdout and one line on stderr, returned.
fn failure(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "expected failure, got: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(o.stdout.is_empty(), "no partial map on failure");
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line of reason on stderr, got: {err:?}");
    lines[0].to_owned()
}

fn json(args: &[&str]) -> DerpMap {
    let out = success(&run(args));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not a DERPMap ({e}):\n{out}"))
}

fn headscale(args: &[&str]) -> HsMap {
    let mut args = args.to_vec();
    args.extend(["--format", "headscale"]);
    let out = success(&run(&args));
    serde_norway::from_str(&out).unwrap_or_else(|e| panic!("not headscale's layout ({e}):\n{out}"))
}

fn example() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/derpmap.toml.example")
        .display()
        .to_string()
}

/// `text` as a `--from` file in a fresh directory (kept alive by the guard).
fn toml_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("map.toml");
    std::fs::write(&path, text).expect("write map");
    let path = path.display().to_string();
    (dir, path)
}

const REGION: &str = "[[regions]]\nid = 900\ncode = \"a\"\nname = \"A\"\n";
const NODE: &str = "[[regions.nodes]]\nhost_name = \"derp.example.com\"\n";

// ------------------------------------------------------------ one node from flags

#[test]
fn flags_default_to_one_node_with_stun_on_3478() {
    let m = json(&["--hostname", "derp.example.com"]);
    assert_eq!(m.omit_default_regions, None, "omitted unless asked for");
    assert!(m.home_params.is_none());
    assert_eq!(m.regions.keys().collect::<Vec<_>>(), ["900"]);
    let r = &m.regions["900"];
    assert_eq!(
        (r.region_id, r.region_code.as_str(), r.region_name.as_str()),
        (900, "myrelay", "My Relay")
    );
    assert_eq!((r.latitude, r.longitude), (None, None));
    assert_eq!((r.no_measure_no_home, r.avoid), (None, None));
    assert_eq!(r.nodes, [Node::plain("900a", 900, "derp.example.com")]);
}

#[test]
fn flags_set_every_node_field() {
    let args = [
        "--hostname",
        "derp.example.com",
        "--region-id",
        "950",
        "--region-code",
        "lab",
        "--region-name",
        "Test lab",
        "--node-name",
        "lab1",
        "--port",
        "8443",
        "--stun-port",
        "3479",
        "--ipv4",
        "198.51.100.7",
        "--ipv6",
        "none",
        "--can-port-80",
        "--insecure-for-tests",
        "--omit-default-regions",
    ];
    let m = json(&args);
    assert_eq!(m.omit_default_regions, Some(true));
    let r = &m.regions["950"];
    assert_eq!((r.region_id, r.region_code.as_str()), (950, "lab"));
    let want = Node {
        ipv4: Some("198.51.100.7".into()),
        ipv6: Some("none".into()),
        stun_port: Some(3479),
        derp_port: Some(8443),
        can_port_80: Some(true),
        insecure_for_tests: Some(true),
        ..Node::plain("lab1", 950, "derp.example.com")
    };
    assert_eq!(r.nodes, [want]);
    let out = run(&args);
    assert!(
        stderr(&out).contains("InsecureForTests"),
        "a note warns about insecure_for_tests: {}",
        stderr(&out)
    );

    let hs = headscale(&args);
    let n = &hs.regions[&950].nodes[0];
    assert_eq!(hs.regions[&950].regionid, 950);
    assert_eq!((n.name.as_str(), n.regionid), ("lab1", 950));
    assert_eq!(n.hostname, "derp.example.com");
    assert_eq!((n.stunport, n.stunonly, n.derpport), (3479, false, 8443));
    assert_eq!(n.ipv4.as_deref(), Some("198.51.100.7"));
    assert_eq!(n.ipv6.as_deref(), Some("none"));
    assert_eq!((n.canport80, n.insecurefortests), (Some(true), Some(true)));
}

#[test]
fn stun_can_be_disabled_but_not_set_to_zero() {
    let out = run(&["--hostname", "derp.example.com", "--stun-port", "-1"]);
    let m: DerpMap = serde_json::from_str(&success(&out)).expect("JSON");
    assert_eq!(m.regions["900"].nodes[0].stun_port, Some(-1));
    assert!(
        stderr(&out).contains("STUN"),
        "a note on stderr explains -1"
    );
    for bad in ["0", "65536", "-2"] {
        let out = run(&["--hostname", "derp.example.com", "--stun-port", bad]);
        assert!(!out.status.success(), "--stun-port {bad} must be refused");
    }
}

// ------------------------------------------------------------ --from FILE.toml

#[test]
fn the_example_file_gives_a_mesh_region_and_a_single_node_region() {
    let m = json(&["--from", &example()]);
    assert_eq!(m.omit_default_regions, None, "the example sets it false");
    assert_eq!(m.regions.keys().collect::<Vec<_>>(), ["900", "901"]);

    let ams = &m.regions["900"];
    assert_eq!(
        (
            ams.region_id,
            ams.region_code.as_str(),
            ams.region_name.as_str()
        ),
        (900, "ams", "Amsterdam")
    );
    let ams1 = Node {
        ipv4: Some("203.0.113.10".into()),
        ipv6: Some("2001:db8::10".into()),
        can_port_80: Some(true),
        ..Node::plain("900a", 900, "derp-ams1.example.com")
    };
    let ams2 = Node {
        ipv4: Some("203.0.113.11".into()),
        ipv6: Some("2001:db8::11".into()),
        ..Node::plain("900b", 900, "derp-ams2.example.com")
    };
    assert_eq!(ams.nodes, [ams1, ams2], "both nodes, in file order");

    let nyc = &m.regions["901"];
    assert_eq!((nyc.region_id, nyc.region_code.as_str()), (901, "nyc"));
    let nyc1 = Node {
        stun_port: Some(-1),
        derp_port: Some(8443),
        ..Node::plain("901a", 901, "derp-nyc.example.com")
    };
    assert_eq!(nyc.nodes, [nyc1]);

    let out = run(&["--from", &example()]);
    assert!(
        stderr(&out).contains("region 900 has 2 DERP nodes"),
        "a note says mesh regions must mesh: {}",
        stderr(&out)
    );

    let m = json(&["--from", &example(), "--omit-default-regions"]);
    assert_eq!(m.omit_default_regions, Some(true));
}

#[test]
fn the_example_file_in_headscale_layout() {
    let hs = headscale(&["--from", &example()]);
    assert_eq!(hs.regions.keys().collect::<Vec<_>>(), [&900, &901]);
    let ams = &hs.regions[&900];
    assert_eq!(
        (
            ams.regionid,
            ams.regioncode.as_str(),
            ams.regionname.as_str()
        ),
        (900, "ams", "Amsterdam")
    );
    assert_eq!(
        (ams.latitude, ams.longitude, ams.nomeasurenohome),
        (None, None, None)
    );
    let names: Vec<&str> = ams.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["900a", "900b"]);
    let a = &ams.nodes[0];
    assert_eq!(a.regionid, 900);
    assert_eq!(a.hostname, "derp-ams1.example.com");
    assert_eq!(a.ipv4.as_deref(), Some("203.0.113.10"));
    assert_eq!(a.ipv6.as_deref(), Some("2001:db8::10"));
    assert_eq!((a.stunport, a.stunonly, a.derpport), (3478, false, 443));
    assert_eq!(
        (a.canport80, a.insecurefortests, a.certname.as_deref()),
        (Some(true), None, None)
    );
    assert_eq!(ams.nodes[1].canport80, None);

    let nyc = &hs.regions[&901].nodes[0];
    assert_eq!((nyc.name.as_str(), nyc.regionid), ("901a", 901));
    assert_eq!((nyc.stunport, nyc.derpport), (-1, 8443));
    assert_eq!((nyc.ipv4.as_deref(), nyc.ipv6.as_deref()), (None, None));
}

#[test]
fn files_set_the_optional_fields_and_default_node_names() {
    let (_dir, path) = toml_file(
        "omit_default_regions = true\n\
         [[regions]]\nid = 999\ncode = \"edge\"\nname = \"Edge\"\n\
         latitude = 52.5\nlongitude = 13.4\nno_measure_no_home = true\n\
         [[regions.nodes]]\nhost_name = \"stun.example.com\"\nstun_only = true\n\
         [[regions.nodes]]\nhost_name = \"derp.example.com\"\ncert_name = \"derp.internal\"\n\
         insecure_for_tests = true\n",
    );
    let m = json(&["--from", &path]);
    assert_eq!(m.omit_default_regions, Some(true), "set in the file");
    let r = &m.regions["999"];
    assert_eq!((r.latitude, r.longitude), (Some(52.5), Some(13.4)));
    assert_eq!(r.no_measure_no_home, Some(true));
    let stun = Node {
        stun_only: Some(true),
        ..Node::plain("999a", 999, "stun.example.com")
    };
    let derp = Node {
        cert_name: Some("derp.internal".into()),
        insecure_for_tests: Some(true),
        ..Node::plain("999b", 999, "derp.example.com")
    };
    assert_eq!(r.nodes, [stun, derp]);

    let hs = headscale(&["--from", &path]);
    let r = &hs.regions[&999];
    assert_eq!((r.latitude, r.longitude), (Some(52.5), Some(13.4)));
    assert_eq!(r.nomeasurenohome, Some(true));
    assert!(r.nodes[0].stunonly);
    assert_eq!(r.nodes[1].certname.as_deref(), Some("derp.internal"));
    assert_eq!(r.nodes[1].insecurefortests, Some(true));
}

// ------------------------------------------------------------ errors

/// The one line a `--from` file with `text` fails with.
fn file_error(text: &str) -> (String, String) {
    let (_dir, path) = toml_file(text);
    let why = failure(&run(&["--from", &path]));
    assert!(why.contains(&path), "the message names the file: {why}");
    (path, why)
}

#[test]
fn region_ids_outside_900_999_are_refused_with_the_line() {
    for id in ["42", "1000", "-900"] {
        let (path, why) = file_error(&format!(
            "# a comment\n[[regions]]\nid = {id}\ncode = \"a\"\nname = \"A\"\n{NODE}"
        ));
        assert!(why.contains(&format!("{path}, line 3:")), "{why}");
        assert!(why.contains(&format!("region id {id}")), "{why}");
        assert!(why.contains("900-999"), "{why}");
    }
}

#[test]
fn duplicate_region_ids_and_node_names_are_refused() {
    let (path, why) = file_error(&format!("{REGION}{NODE}{REGION}{NODE}"));
    assert!(why.contains(&format!("{path}, line 8:")), "{why}");
    assert!(
        why.contains("region id 900 is already used on line 2"),
        "{why}"
    );

    let (path, why) = file_error(&format!(
        "{REGION}[[regions.nodes]]\nname = \"x\"\nhost_name = \"a.example\"\n\
         [[regions]]\nid = 901\ncode = \"b\"\nname = \"B\"\n\
         [[regions.nodes]]\nname = \"x\"\nhost_name = \"b.example\"\n"
    ));
    assert!(why.contains(&format!("{path}, line 13:")), "{why}");
    assert!(
        why.contains("node name \"x\" is already used on line 6"),
        "{why}"
    );

    // A default name counts too: the first node of 900 is 900a.
    let (_, why) = file_error(&format!(
        "{REGION}{NODE}[[regions.nodes]]\nname = \"900a\"\nhost_name = \"b.example\"\n"
    ));
    assert!(why.contains("node name \"900a\" is already used"), "{why}");
}

#[test]
fn malformed_toml_names_the_line() {
    let (path, why) = file_error("[[regions]]\nid = 900\ncode = \"unterminated\nname = \"A\"\n");
    assert!(why.contains(&format!("{path}, line 3:")), "{why}");

    let (path, why) = file_error(&format!("{REGION}{NODE}stun_prot = 3478\n"));
    assert!(why.contains(&format!("{path}, line 7:")), "{why}");
    assert!(why.contains("stun_prot"), "a typo is named: {why}");

    let (_, why) = file_error(&format!("{REGION}{NODE}derp_port = \"443\"\n"));
    assert!(why.contains("line 7"), "a wrong type: {why}");
}

#[test]
fn bad_values_in_files_name_the_line() {
    for (line, why_contains) in [
        ("stun_port = 0", "stun_port 0 means Tailscale's default"),
        ("derp_port = 0", "derp_port 0 is not a port"),
        ("ipv4 = \"2001:db8::1\"", "ipv4"),
        ("ipv6 = \"203.0.113.1\"", "ipv6"),
    ] {
        let (path, why) = file_error(&format!("{REGION}{NODE}{line}\n"));
        assert!(
            why.contains(&format!("{path}, line 7: {why_contains}")),
            "{line}: {why}"
        );
    }
    let (path, why) = file_error(&format!(
        "{REGION}[[regions.nodes]]\nhost_name = \"https://derp.example.com\"\n"
    ));
    assert!(why.contains(&format!("{path}, line 6: host_name")), "{why}");

    let (_, why) = file_error(&format!("{REGION}avoid = true\n{NODE}"));
    assert!(
        why.contains("line 5") && why.contains("no_measure_no_home"),
        "{why}"
    );

    let (_, why) = file_error(REGION);
    assert!(why.contains("region 900 has no nodes"), "{why}");

    let (_, why) = file_error("# nothing yet\n");
    assert!(why.contains("no regions"), "{why}");
}

#[test]
fn a_missing_file_and_mixed_flags_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("absent.toml").display().to_string();
    let why = failure(&run(&["--from", &path]));
    assert!(why.contains(&format!("cannot read {path}")), "{why}");

    // --from describes every node: one-node flags beside it are a mistake.
    let out = run(&["--from", &example(), "--hostname", "derp.example.com"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--from"), "{}", stderr(&out));
    assert!(
        !run(&[]).status.success(),
        "--hostname or --from is required"
    );
}
