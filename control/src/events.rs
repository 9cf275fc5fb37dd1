//! core/v1 Events, as the scheduler and the controllers report what they
//! do (`kubectl describe` and `kubectl get events` read these). Like
//! client-go's recorder, a repeat of the same (object, reason, message)
//! bumps `count` and `lastTimestamp` of the earlier Event instead of adding
//! a new one. Recording is best effort: a failure is logged, never fatal.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Resource};

pub const NORMAL: &str = "Normal";
pub const WARNING: &str = "Warning";

/// (object uid, reason, message).
type EventKey = (String, String, String);
/// (namespace, event name, count).
type Recorded = (String, String, i32);

pub struct Recorder {
    client: Client,
    component: String,
    /// (object uid, reason, message) → (namespace, event name, count).
    seen: Mutex<HashMap<EventKey, Recorded>>,
}

/// A reference to `o` for `involvedObject`.
pub fn reference<K: Resource<DynamicType = ()>>(o: &K) -> ObjectReference {
    let m = o.meta();
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        namespace: m.namespace.clone(),
        name: m.name.clone(),
        uid: m.uid.clone(),
        resource_version: m.resource_version.clone(),
        field_path: None,
    }
}

impl Recorder {
    pub fn new(client: Client, component: &str) -> Recorder {
        Recorder {
            client,
            component: component.to_string(),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Records an event about `o`.
    pub async fn emit<K: Resource<DynamicType = ()>>(
        &self,
        o: &K,
        type_: &str,
        reason: &str,
        message: &str,
    ) {
        self.emit_ref(reference(o), type_, reason, message).await
    }

    pub async fn emit_ref(&self, obj: ObjectReference, type_: &str, reason: &str, message: &str) {
        // Events of cluster-scoped objects live in `default`, as upstream.
        let ns = obj.namespace.clone().unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        let now = jiff::Timestamp::now();
        let key = (
            obj.uid.clone().unwrap_or_default(),
            reason.to_string(),
            message.to_string(),
        );
        let earlier = self.seen.lock().expect("events lock").get(&key).cloned();
        if let Some((ns, name, count)) = earlier {
            let patch = serde_json::json!({
                "count": count + 1,
                "lastTimestamp": Time(now),
            });
            let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
            if api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .is_ok()
            {
                self.seen
                    .lock()
                    .expect("events lock")
                    .insert(key, (ns, name, count + 1));
                return;
            }
        }
        let ev = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!(
                    "{}.",
                    obj.name.clone().unwrap_or_else(|| "object".into())
                )),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: obj,
            reason: Some(reason.to_string()),
            message: Some(message.to_string()),
            type_: Some(type_.to_string()),
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            action: Some(reason.to_string()),
            reporting_component: Some(self.component.clone()),
            reporting_instance: Some(self.component.clone()),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: None,
            }),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &ev).await {
            Ok(created) => {
                let mut seen = self.seen.lock().expect("events lock");
                // Bounded: forget everything rather than grow forever.
                if seen.len() > 4096 {
                    seen.clear();
                }
                seen.insert(key, (ns, created.metadata.name.unwrap_or_default(), 1));
            }
            Err(e) => eprintln!(
                "kcontrol: {}: recording event {reason}: {e}",
                self.component
            ),
        }
    }
}
