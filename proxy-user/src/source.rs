//! The manifests source, incremental: a change to one file costs work in
//! proportion to that file and the services it touches, not to the whole
//! directory. Files are re-read only when their fingerprint (size, mtime,
//! inode) changed; only services whose Service or EndpointSlices changed are
//! recomputed; the result is the list of [`Change`]s for the dataplane.
//!
//! A file that fails to parse or validate is rejected as a whole with an
//! error naming it and the object; its previous content stays in force.
//! Other files changed in the same refresh still apply.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::manifests::{self, LoadError, Objects};
use crate::model::{self, DesiredService, DesiredState, Frontend, SliceView, SvcView};
use crate::reconcile::Change;

/// (namespace, name) of a Service.
type SvcId = (String, String);

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

#[derive(Default)]
struct FileEntry {
    services: Vec<SvcView>,
    slices: Vec<SliceView>,
}

impl FileEntry {
    fn svc_ids(&self) -> impl Iterator<Item = SvcId> + '_ {
        self.services
            .iter()
            .map(|s| (s.ns.clone(), s.name.clone()))
            .chain(
                self.slices
                    .iter()
                    .map(|s| (s.ns.clone(), s.service.clone())),
            )
    }
}

/// Result of one refresh.
#[derive(Default)]
pub struct Refresh {
    /// Changes to apply, removals first.
    pub changes: Vec<Change>,
    /// Files rejected in this refresh (their previous content is kept).
    pub rejected: Vec<LoadError>,
    /// Files re-read.
    pub files_read: usize,
}

pub struct ManifestSource {
    root: PathBuf,
    /// Fingerprint of every file as last seen, accepted or rejected.
    seen: BTreeMap<PathBuf, FileFp>,
    files: BTreeMap<PathBuf, FileEntry>,
    services: BTreeMap<SvcId, (PathBuf, SvcView)>,
    /// service → (file, slice namespace/name) → slice
    slices: BTreeMap<SvcId, BTreeMap<(PathBuf, String), SliceView>>,
    /// (namespace, slice name) → file, to catch a slice defined twice.
    slice_files: BTreeMap<(String, String), PathBuf>,
    frontends_of: BTreeMap<SvcId, Vec<Frontend>>,
    owner: BTreeMap<Frontend, SvcId>,
    state: DesiredState,
}

impl ManifestSource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            seen: BTreeMap::new(),
            files: BTreeMap::new(),
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slice_files: BTreeMap::new(),
            frontends_of: BTreeMap::new(),
            owner: BTreeMap::new(),
            state: DesiredState::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The desired state of every accepted file.
    pub fn state(&self) -> &DesiredState {
        &self.state
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
                    out.rejected.push(e);
                    return out;
                }
            },
        };
        // frontend → its desired service before this refresh (first touch).
        let mut before: BTreeMap<Frontend, Option<DesiredService>> = BTreeMap::new();
        // Read every changed file first, so that an object moving from one
        // file to another in the same change is not seen twice.
        let mut fresh: Vec<(PathBuf, FileEntry)> = Vec::new();
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
                    match read_file(&file) {
                        Ok(e) => fresh.push((file, e)),
                        Err(e) => out.rejected.push(e),
                    }
                }
                None => {
                    self.seen.remove(&file);
                    fresh.push((file, FileEntry::default()));
                }
            }
        }
        // Pass 1: take out the old content of every changed file (removal
        // cannot conflict). Pass 2: put the new content in, file by file.
        let mut olds = BTreeMap::new();
        for (file, _) in &fresh {
            if let Ok(old) = self.replace_file(file, FileEntry::default(), &mut before) {
                olds.insert(file.clone(), old);
            }
        }
        for (file, new) in fresh {
            if let Err(e) = self.replace_file(&file, new, &mut before) {
                out.rejected.push(e);
                let old = olds.remove(&file).unwrap_or_default();
                if let Err(e) = self.replace_file(&file, old, &mut before) {
                    log::error!("previous content of {} no longer fits: {e}", file.display());
                }
            }
        }
        out.changes = self.changes_since(before);
        out
    }

    /// Changes that turn the `before` values of the touched frontends into
    /// their current ones, removals first.
    fn changes_since(&self, before: BTreeMap<Frontend, Option<DesiredService>>) -> Vec<Change> {
        let mut removes = Vec::new();
        let mut others = Vec::new();
        for (fe, old) in before {
            match (old, self.state.services.get(&fe)) {
                (Some(_), None) => removes.push(Change::RemoveService { frontend: fe }),
                (None, Some(new)) => others.push(Change::AddService {
                    frontend: fe,
                    name: new.name.clone(),
                    backends: new.backends.clone(),
                }),
                (Some(old), Some(new)) if old.name != new.name => {
                    // Same frontend now owned by another service port:
                    // re-add so names and counters follow the new owner.
                    removes.push(Change::RemoveService { frontend: fe });
                    others.push(Change::AddService {
                        frontend: fe,
                        name: new.name.clone(),
                        backends: new.backends.clone(),
                    });
                }
                (Some(old), Some(new)) => others.extend(crate::reconcile::update(fe, &old, new)),
                _ => {}
            }
        }
        removes.extend(others);
        removes
    }

    /// Sets the objects of one origin other than a manifest file — e.g. one
    /// object watched from the Kubernetes API (`api/Service/ns/name`) — and
    /// returns the changes. A rejected object keeps the origin's previous
    /// content, exactly like a rejected file.
    pub fn set_origin(
        &mut self,
        origin: &Path,
        services: &[k8s_openapi::api::core::v1::Service],
        slices: &[k8s_openapi::api::discovery::v1::EndpointSlice],
    ) -> Refresh {
        let mut out = Refresh::default();
        let mut before = BTreeMap::new();
        match entry_from_objects(origin, services.iter(), slices.iter()) {
            Ok(entry) => {
                if let Err(e) = self.replace_file(origin, entry, &mut before) {
                    out.rejected.push(e);
                }
            }
            Err(e) => out.rejected.push(e),
        }
        out.changes = self.changes_since(before);
        out
    }

    /// Origins (files or API objects) that currently contribute objects.
    pub fn origins(&self) -> Vec<PathBuf> {
        self.files.keys().cloned().collect()
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

    /// Swaps a file's objects for `new` and returns the old ones, or rejects
    /// `new` and keeps the old.
    fn replace_file(
        &mut self,
        file: &Path,
        new: FileEntry,
        before: &mut BTreeMap<Frontend, Option<DesiredService>>,
    ) -> Result<FileEntry, LoadError> {
        let reject = |message: String| LoadError {
            file: file.to_path_buf(),
            message,
        };
        // Objects defined in another file too.
        for s in &new.services {
            let id = (s.ns.clone(), s.name.clone());
            if let Some((other, _)) = self.services.get(&id).filter(|(f, _)| f != file) {
                return Err(reject(format!(
                    "Service {}/{}: also defined in {}",
                    s.ns,
                    s.name,
                    other.display()
                )));
            }
        }
        for s in &new.slices {
            if let Some(other) = self
                .slice_files
                .get(&(s.ns.clone(), s.name.clone()))
                .filter(|f| f.as_path() != file)
            {
                return Err(reject(format!(
                    "EndpointSlice {}/{}: also defined in {}",
                    s.ns,
                    s.name,
                    other.display()
                )));
            }
        }
        let old = self.files.remove(file).unwrap_or_default();
        let affected: BTreeSet<SvcId> = old.svc_ids().chain(new.svc_ids()).collect();
        self.unindex(file, &old);
        self.index(file, &new);
        // New frontends of the affected services; a frontend already owned
        // by a service outside this change is a conflict.
        let mut computed: BTreeMap<SvcId, Vec<(Frontend, DesiredService)>> = BTreeMap::new();
        let mut claimed: BTreeMap<Frontend, SvcId> = BTreeMap::new();
        let mut conflict = None;
        for id in &affected {
            let fes = match self.services.get(id) {
                Some((_, svc)) => {
                    let slices = self.slices.get(id);
                    model::frontends(svc, slices.into_iter().flat_map(|m| m.values()))
                }
                None => Vec::new(),
            };
            for (fe, _) in &fes {
                let holder = claimed
                    .get(fe)
                    .or_else(|| self.owner.get(fe).filter(|o| !affected.contains(*o)));
                if let Some(holder) = holder {
                    conflict = Some(format!(
                        "Service {}/{}: frontend {fe} is already used by Service {}/{}",
                        id.0, id.1, holder.0, holder.1
                    ));
                }
                claimed.insert(*fe, id.clone());
            }
            computed.insert(id.clone(), fes);
        }
        if let Some(message) = conflict {
            self.unindex(file, &new);
            self.index(file, &old);
            self.files.insert(file.to_path_buf(), old);
            return Err(reject(message));
        }
        for id in &affected {
            for fe in self.frontends_of.remove(id).unwrap_or_default() {
                before
                    .entry(fe)
                    .or_insert_with(|| self.state.services.get(&fe).cloned());
                self.state.services.remove(&fe);
                self.owner.remove(&fe);
            }
        }
        for (id, fes) in computed {
            let mut list = Vec::with_capacity(fes.len());
            for (fe, desired) in fes {
                before
                    .entry(fe)
                    .or_insert_with(|| self.state.services.get(&fe).cloned());
                self.state.services.insert(fe, desired);
                self.owner.insert(fe, id.clone());
                list.push(fe);
            }
            if !list.is_empty() {
                self.frontends_of.insert(id, list);
            }
        }
        if !new.services.is_empty() || !new.slices.is_empty() {
            self.files.insert(file.to_path_buf(), new);
        }
        Ok(old)
    }

    fn index(&mut self, file: &Path, e: &FileEntry) {
        for s in &e.services {
            self.services.insert(
                (s.ns.clone(), s.name.clone()),
                (file.to_path_buf(), s.clone()),
            );
        }
        for s in &e.slices {
            self.slices
                .entry((s.ns.clone(), s.service.clone()))
                .or_default()
                .insert((file.to_path_buf(), s.name.clone()), s.clone());
            self.slice_files
                .insert((s.ns.clone(), s.name.clone()), file.to_path_buf());
        }
    }

    fn unindex(&mut self, file: &Path, e: &FileEntry) {
        for s in &e.services {
            self.services.remove(&(s.ns.clone(), s.name.clone()));
        }
        for s in &e.slices {
            let id = (s.ns.clone(), s.service.clone());
            if let Some(m) = self.slices.get_mut(&id) {
                m.remove(&(file.to_path_buf(), s.name.clone()));
                if m.is_empty() {
                    self.slices.remove(&id);
                }
            }
            self.slice_files.remove(&(s.ns.clone(), s.name.clone()));
        }
    }
}

/// Parses and validates one file into views.
fn read_file(file: &Path) -> Result<FileEntry, LoadError> {
    let text = std::fs::read_to_string(file).map_err(|e| LoadError {
        file: file.to_path_buf(),
        message: format!("cannot read: {e}"),
    })?;
    let mut objects = Objects::default();
    manifests::parse_text(file, &text, &mut objects)?;
    entry_from_objects(
        file,
        objects.services.iter().map(|(_, s)| s),
        objects.slices.iter().map(|(_, s)| s),
    )
}

/// Validates objects into views; the first invalid one rejects them all.
fn entry_from_objects<'a>(
    file: &Path,
    services: impl Iterator<Item = &'a k8s_openapi::api::core::v1::Service>,
    slices: impl Iterator<Item = &'a k8s_openapi::api::discovery::v1::EndpointSlice>,
) -> Result<FileEntry, LoadError> {
    let err = |e: model::ObjectError| LoadError {
        file: file.to_path_buf(),
        message: e.to_string(),
    };
    let mut entry = FileEntry::default();
    for s in services {
        entry.services.push(model::view_service(s).map_err(err)?);
    }
    for s in slices {
        if let Some(v) = model::view_slice(s).map_err(err)? {
            entry.slices.push(v);
        }
    }
    // The same object twice in one file is as wrong as in two files.
    let mut ids = BTreeSet::new();
    for s in &entry.services {
        if !ids.insert(("Service", &s.ns, &s.name)) {
            return Err(LoadError {
                file: file.to_path_buf(),
                message: format!("Service {}/{}: defined twice in this file", s.ns, s.name),
            });
        }
    }
    for s in &entry.slices {
        if !ids.insert(("EndpointSlice", &s.ns, &s.name)) {
            return Err(LoadError {
                file: file.to_path_buf(),
                message: format!(
                    "EndpointSlice {}/{}: defined twice in this file",
                    s.ns, s.name
                ),
            });
        }
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::diff;

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
        let mut src = ManifestSource::new(&d.0);
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
        let mut src = ManifestSource::new(&d.0);
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
}
