//! `crds/` must be exactly what `copyhold crdgen` writes from the types.

use copyhold::resources::{crd_yaml, crds};

#[test]
fn crds_directory_matches_the_rust_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let mut stale = Vec::new();
    for (name, crd) in crds() {
        let want = crd_yaml(&crd).expect("CRD serializes");
        let have = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        if have != want {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "crds/ is stale for {stale:?}: run `cargo run -p copyhold -- crdgen --out crds`"
    );
}

/// The YAML writer folds long descriptions and quotes what needs it:
/// whatever it chose, the files must read back as the very CRDs (a
/// reader that joined two lines without their space, or lost a tab,
/// would change what `kubectl explain` shows).
#[test]
fn the_crd_files_read_back_as_the_types_crds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for (name, crd) in crds() {
        let text = std::fs::read_to_string(dir.join(name)).expect("crds/ file");
        let back: serde_json::Value = serde_saphyr::from_str(&text).expect("CRD file parses");
        assert_eq!(
            back,
            serde_json::to_value(&crd).expect("CRD serializes"),
            "{name}"
        );
    }
}

#[test]
fn every_crd_has_status_short_name_and_the_copyhold_category() {
    for (name, crd) in crds() {
        let v = &crd.spec.versions[0];
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{name}: status subresource"
        );
        assert!(
            crd.spec
                .names
                .short_names
                .as_ref()
                .is_some_and(|s| !s.is_empty()),
            "{name}: short name"
        );
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["copyhold".to_string()][..]),
            "{name}"
        );
        assert!(
            v.additional_printer_columns
                .as_ref()
                .is_some_and(|c| c.len() >= 4),
            "{name}: printer columns"
        );
    }
}

#[test]
fn every_spec_field_has_a_description() {
    fn walk(path: &str, v: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
            for (k, child) in props {
                let p = format!("{path}.{k}");
                if child.get("description").is_none() {
                    missing.push(p.clone());
                }
                walk(&p, child, missing);
            }
        }
        if let Some(items) = v.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let mut missing = Vec::new();
    for (name, crd) in crds() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        walk(name, spec, &mut missing);
    }
    assert!(
        missing.is_empty(),
        "fields without doc comments (kubectl explain shows nothing): {missing:#?}"
    );
}
