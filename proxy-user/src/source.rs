//! The manifests source, incremental: a change to one file costs work in
//! proportion to that file and the services it touches, not to the whole
//! directory. Files are re-read only when their fingerprint (size, mtime,
//! inode) changed; the [`Index`] recomputes only the services whose Service
//! or EndpointSlices changed; the result is the list of
//! [`Change`](crate::reconcile::Change)s for the
//! datapath, from [`reconcile::diff_touched`].
//!
//! A file that fails to parse or validate is rejected as a whole with an
//! error naming it and the object; its previous content stays in force.
//! Other files changed in the same refresh still apply. (Objects from the
//! Kubernetes API do not pass through here: the API source feeds its own
//! [`Index`] through [`Index::set_origin`].)

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::index::{Entry, Index, Origin, Refresh, Rejected};
use crate::manifests::{self, LoadError, Objects};
use crate::model::{DesiredState, Node};
use crate::reconcile::{self, Before};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileFp {
    len: u64,
    mtime: Option<SystemTime>,
    ino: u64,
}

fn fingerprint(path: &Path) -> Option<FileFp> {
    let m = std::fs::metadata(path).ok()?;
    m.is_file().then(|| FileFp {
        len: m.len(),
        mtime: m.modified().ok(),
        ino: m.ino(),
    })
}

pub struct ManifestSource {
    root: PathBuf,
    /// Fingerprint of every file as last seen, accepted or rejected.
    seen: BTreeMap<PathBuf, FileFp>,
    index: Index,
}

impl ManifestSource {
    pub fn new(root: impl Into<PathBuf>, node: Node) -> Self {
        Self {
            root: root.into(),
            seen: BTreeMap::new(),
            index: Index::new(node),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The desired state of every accepted origin.
    pub fn state(&self) -> &DesiredState {
        self.index.state()
    }

    /// Looks for changed files — all of them, or only `hint` (paths an
    /// inotify event named) — and folds them into the state.
    pub fn refresh(&mut self, hint: Option<&BTreeSet<PathBuf>>) -> Refresh {
        let mut out = Refresh::default();
        let candidates: BTreeSet<PathBuf> = match hint {
            Some(h) => h.iter().filter(|p| self.is_manifest(p)).cloned().collect(),
            None => match manifests::manifest_files(&self.root) {
                Ok(files) => files.into_iter().chain(self.seen.keys().cloned()).collect(),
                Err(e) => {
                    out.rejected.push(file_rejected(e));
                    return out;
                }
            },
        };
        let mut before = Before::new();
        // Read every changed file first, so that an object moving from one
        // file to another in the same change is not seen twice.
        let mut fresh: Vec<(Origin, Entry)> = Vec::new();
        for file in candidates {
            let fp = fingerprint(&file);
            if fp.is_none() && !self.seen.contains_key(&file) {
                continue;
            }
            if fp.is_some() && self.seen.get(&file) == fp.as_ref() {
                continue;
            }
            match fp {
                Some(fp) => {
                    self.seen.insert(file.clone(), fp);
                    out.files_read += 1;
                    match read_file(&file, self.index.node()) {
                        Ok(e) => fresh.push((Origin::File(file), e)),
                        Err(e) => out.rejected.push(e),
                    }
                }
                None => {
                    self.seen.remove(&file);
                    fresh.push((Origin::File(file), Entry::default()));
                }
            }
        }
        // Pass 1: take out the old content of every changed file (removal
        // cannot conflict). Pass 2: put the new content in, file by file.
        let mut olds = BTreeMap::new();
        for (origin, _) in &fresh {
            if let Ok(old) = self.index.replace(origin, Entry::default(), &mut before) {
                olds.insert(origin.clone(), old);
            }
        }
        for (origin, new) in fresh {
            if let Err(e) = self.index.replace(&origin, new, &mut before) {
                out.rejected.push(e);
                let old = olds.remove(&origin).unwrap_or_default();
                if let Err(e) = self.index.replace(&origin, old, &mut before) {
                    log::error!("previous content of {origin} no longer fits: {e}");
                }
            }
        }
        out.changes = reconcile::diff_touched(&before, self.state());
        out
    }

    fn is_manifest(&self, p: &Path) -> bool {
        if p == self.root {
            return true;
        }
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        p.parent() == Some(self.root.as_path())
            && !name.starts_with('.')
            && matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
    }
}

fn file_rejected(e: LoadError) -> Rejected {
    Rejected {
        origin: Origin::File(e.file),
        message: e.message,
    }
}

/// Parses and validates one file.
fn read_file(file: &Path, node: &Node) -> Result<Entry, Rejected> {
    let text = std::fs::read_to_string(file).map_err(|e| Rejected {
        origin: Origin::File(file.to_path_buf()),
        message: format!("cannot read: {e}"),
    })?;
    let mut objects = Objects::default();
    manifests::parse_text(file, &text, &mut objects).map_err(file_rejected)?;
    Entry::new(
        &Origin::File(file.to_path_buf()),
        node,
        objects.services.iter().map(|(_, s)| s),
        objects.slices.iter().map(|(_, s)| s),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{Change, diff};

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn tempdir(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("kproxy-src-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn write(dir: &Path, name: &str, text: &str) {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, dir.join(name)).unwrap();
    }
    fn svc(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}]}}\n---\n"
        )
    }
    fn slice(name: &str, svc: &str, ips: &[&str]) -> String {
        let eps: Vec<String> = ips
            .iter()
            .map(|i| format!("{{addresses: [{i}]}}"))
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nendpoints: [{}]\nports: [{{name: http, port: 8080}}]\n---\n",
            eps.join(", ")
        )
    }

    /// The incremental state always equals a from-scratch load.
    fn assert_matches_full_load(src: &ManifestSource) {
        let full = manifests::load(src.root()).unwrap();
        assert_eq!(src.state(), &full);
    }

    #[test]
    fn incremental_refresh_matches_full_load_and_emits_only_the_difference() {
        let d = tempdir("inc");
        write(
            &d.0,
            "a.yaml",
            &(svc("a", "10.96.0.1") + &slice("a-1", "a", &["10.0.0.1", "10.0.0.2"])),
        );
        write(
            &d.0,
            "b.yaml",
            &(svc("b", "10.96.0.2") + &slice("b-1", "b", &["10.0.0.3"])),
        );
        let mut src = ManifestSource::new(&d.0, Node::default());
        let r = src.refresh(None);
        assert!(r.rejected.is_empty());
        assert_eq!(r.changes.len(), 2);
        assert_matches_full_load(&src);

        // Unchanged directory: nothing read, nothing to do.
        let r = src.refresh(None);
        assert_eq!((r.files_read, r.changes.len()), (0, 0));

        // A slice moves to its own file and changes: only service a changes.
        let prev = src.state().clone();
        write(&d.0, "a.yaml", &svc("a", "10.96.0.1"));
        write(
            &d.0,
            "a-slice.yaml",
            &slice("a-1", "a", &["10.0.0.2", "10.0.0.9"]),
        );
        let r = src.refresh(None);
        assert!(
            r.rejected.is_empty(),
            "{:?}",
            r.rejected.iter().map(|e| e.to_string()).collect::<Vec<_>>()
        );
        assert_eq!(r.changes, diff(&prev, src.state()));
        assert_eq!(r.changes.len(), 1);
        assert_matches_full_load(&src);

        // Hinted refresh reads only the named file; deleting it removes b.
        std::fs::remove_file(d.0.join("b.yaml")).unwrap();
        let r = src.refresh(Some(&[d.0.join("b.yaml")].into()));
        assert_eq!(r.changes.len(), 1);
        assert!(matches!(r.changes[0], Change::RemoveService { .. }));
        assert_matches_full_load(&src);
    }

    #[test]
    fn a_bad_file_keeps_its_previous_content() {
        let d = tempdir("bad");
        write(
            &d.0,
            "a.yaml",
            &(svc("a", "10.96.0.1") + &slice("a-1", "a", &["10.0.0.1"])),
        );
        let mut src = ManifestSource::new(&d.0, Node::default());
        assert!(src.refresh(None).rejected.is_empty());
        let good = src.state().clone();
        write(&d.0, "a.yaml", &slice("a-1", "a", &["10.0.0.300"]));
        let r = src.refresh(None);
        assert_eq!(r.rejected.len(), 1);
        assert!(
            r.rejected[0].message.contains("10.0.0.300"),
            "{}",
            r.rejected[0]
        );
        assert!(r.changes.is_empty());
        assert_eq!(src.state(), &good);
        // Reported once, not on every poll.
        assert!(src.refresh(None).rejected.is_empty());
        // A second file claiming the same ClusterIP:port is rejected.
        write(&d.0, "z.yaml", &svc("z", "10.96.0.1"));
        let r = src.refresh(None);
        assert_eq!(r.rejected.len(), 1);
        assert!(
            r.rejected[0]
                .message
                .contains("already used by Service default/a")
        );
        assert_eq!(src.state(), &good);
    }

    mod incremental_equals_full {
        //! Any sequence of edits, fed to the index one origin at a time,
        //! gives the same changes as the full diff between the states before
        //! and after each edit, and lands a datapath on the same state as one
        //! full diff from the start to the end.

        use proptest::prelude::*;
        use serde_json::json;

        use k8s_openapi::api::core::v1::Service;
        use k8s_openapi::api::discovery::v1::EndpointSlice;

        use super::*;
        use crate::datapath::Datapath;
        use crate::datapath::memory::Memory;
        use crate::index::ApiKind;
        use crate::model::DesiredService;

        #[derive(Clone, Debug)]
        enum Obj {
            Service {
                name: u8,
                ip: u8,
                /// (port, port name, UDP?)
                ports: Vec<(u16, u8, bool)>,
            },
            Slice {
                name: u8,
                service: u8,
                endpoints: Vec<Endpoint>,
                /// (port name, target port, UDP?)
                ports: Vec<(u8, u16, bool)>,
            },
        }

        /// (address, ready, serving, terminating)
        type Endpoint = (u8, Option<bool>, Option<bool>, Option<bool>);

        fn proto(udp: bool) -> &'static str {
            if udp { "UDP" } else { "TCP" }
        }

        fn obj() -> impl Strategy<Value = Obj> {
            // Few names, addresses and ports, so that edits collide: the same
            // object in two origins, one frontend claimed by two services, a
            // frontend changing owner or port name.
            let port_name = 0u8..3;
            prop_oneof![
                (
                    0u8..3,
                    0u8..2,
                    prop::collection::vec(
                        (
                            prop::sample::select(vec![80u16, 81]),
                            port_name.clone(),
                            any::<bool>()
                        ),
                        0..3
                    )
                )
                    .prop_map(|(name, ip, ports)| Obj::Service { name, ip, ports }),
                (
                    0u8..3,
                    0u8..3,
                    prop::collection::vec(
                        (
                            0u8..4,
                            any::<Option<bool>>(),
                            any::<Option<bool>>(),
                            any::<Option<bool>>()
                        ),
                        0..4
                    ),
                    prop::collection::vec(
                        (
                            port_name,
                            prop::sample::select(vec![8080u16, 8081]),
                            any::<bool>()
                        ),
                        0..3
                    )
                )
                    .prop_map(|(name, service, endpoints, ports)| Obj::Slice {
                        name,
                        service,
                        endpoints,
                        ports,
                    }),
            ]
        }

        /// (origin number, its new objects); an empty list removes it.
        fn edit() -> impl Strategy<Value = (u8, Vec<Obj>)> {
            (0u8..4, prop::collection::vec(obj(), 0..3))
        }

        fn origin(n: u8) -> Origin {
            match n {
                0 | 1 => Origin::File(PathBuf::from(format!("/m/{n}.yaml"))),
                _ => Origin::Api {
                    kind: ApiKind::Service,
                    namespace: "default".into(),
                    name: format!("o{n}"),
                },
            }
        }

        fn objects(objs: &[Obj]) -> (Vec<Service>, Vec<EndpointSlice>) {
            let port_name = |n: u8| ["", "http", "dns"][n as usize];
            let mut services = Vec::new();
            let mut slices = Vec::new();
            for o in objs {
                match o {
                    Obj::Service { name, ip, ports } => {
                        let ports: Vec<_> = ports
                            .iter()
                            .map(|(port, n, udp)| {
                                json!({"port": port, "name": port_name(*n), "protocol": proto(*udp)})
                            })
                            .collect();
                        let v = json!({
                            "metadata": {"name": format!("s{name}"), "namespace": "default"},
                            "spec": {"clusterIP": format!("10.96.0.{}", ip + 1), "ports": ports},
                        });
                        services.push(serde_json::from_value(v).unwrap());
                    }
                    Obj::Slice {
                        name,
                        service,
                        endpoints,
                        ports,
                    } => {
                        let endpoints: Vec<_> = endpoints
                            .iter()
                            .map(|(a, ready, serving, terminating)| {
                                json!({
                                    "addresses": [format!("10.0.0.{}", a + 1)],
                                    "conditions": {
                                        "ready": ready, "serving": serving, "terminating": terminating
                                    },
                                })
                            })
                            .collect();
                        let ports: Vec<_> = ports
                            .iter()
                            .map(|(n, port, udp)| {
                                json!({"name": port_name(*n), "port": port, "protocol": proto(*udp)})
                            })
                            .collect();
                        let v = json!({
                            "metadata": {
                                "name": format!("e{name}"),
                                "namespace": "default",
                                "labels": {"kubernetes.io/service-name": format!("s{service}")},
                            },
                            "addressType": "IPv4",
                            "endpoints": endpoints,
                            "ports": ports,
                        });
                        slices.push(serde_json::from_value(v).unwrap());
                    }
                }
            }
            (services, slices)
        }

        /// What a datapath holds for a desired state: draining backends
        /// are not in it.
        fn programmed(s: &DesiredState) -> DesiredState {
            DesiredState {
                services: s
                    .services
                    .iter()
                    .map(|(fe, d)| {
                        let svc = DesiredService {
                            policy: d.policy.clone(),
                            ..DesiredService::new(d.name.clone(), d.backends.clone())
                        };
                        (*fe, svc)
                    })
                    .collect(),
                health_checks: Default::default(),
            }
        }

        fn set(src: &mut Index, (n, objs): &(u8, Vec<Obj>)) -> Refresh {
            let (services, slices) = objects(objs);
            src.set_origin(&origin(*n), &services, &slices)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn any_edit_sequence_lands_where_one_full_diff_does(
                setup in prop::collection::vec(edit(), 0..6),
                edits in prop::collection::vec(edit(), 1..12),
            ) {
                let mut src = Index::new(Node::default());
                for e in &setup {
                    set(&mut src, e);
                }
                let start = src.state().clone();
                let mut incremental = Memory::with_state(programmed(&start));
                for e in &edits {
                    let prev = src.state().clone();
                    let r = set(&mut src, e);
                    prop_assert_eq!(&r.changes, &reconcile::diff(&prev, src.state()));
                    incremental.apply(&r.changes).unwrap();
                    prop_assert_eq!(incremental.programmed_state(), programmed(src.state()));
                }
                let mut full = Memory::with_state(programmed(&start));
                full.apply(&reconcile::diff(&start, src.state())).unwrap();
                prop_assert_eq!(full.programmed_state(), incremental.programmed_state());
            }
        }
    }
}
