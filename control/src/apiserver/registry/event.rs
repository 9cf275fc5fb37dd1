//! Events (core/v1), as controllers and kubelets record them.

use k8s_openapi::api::core::v1::Event;
use serde_json::{Value, json};

use super::Strategy;
use crate::apiserver::resources::ResourceType;
use crate::apiserver::status::{ApiResult, FieldError};
use crate::apiserver::table::*;
use crate::apiserver::validate::*;

pub const RESOURCE: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "events",
    singular: "event",
    kind: "Event",
    namespaced: true,
    short_names: &["ev"],
    categories: &[],
    subresources: &[],
    field_labels: &[
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    ],
    delete_returns_object: false,
    strategy: &EventStrategy,
};

pub struct EventStrategy;

impl Strategy for EventStrategy {
    fn normalize(
        &self,
        rt: &ResourceType,
        input: &Value,
        old: Option<&Value>,
    ) -> ApiResult<(Value, Vec<FieldError>)> {
        typed::<Event>(rt, input, old, |_| {}, |_, _| Vec::new())
    }

    /// Events are named `<object>.<hex>`; any path segment will do.
    fn check_name(&self, name: &str) -> Result<(), &'static str> {
        if !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '%']) {
            Ok(())
        } else {
            Err("may not be '.' or '..' and may not contain '/' or '%'")
        }
    }

    fn columns(&self) -> Vec<Value> {
        vec![
            col(
                "Last Seen",
                "string",
                0,
                "The time at which the most recent occurrence of this event was recorded.",
            ),
            col(
                "Type",
                "string",
                0,
                "Type of this event (Normal, Warning), new types could be added in the future.",
            ),
            col(
                "Reason",
                "string",
                0,
                "This should be a short, machine understandable string that gives the reason for the transition into the object's current status.",
            ),
            col(
                "Object",
                "string",
                0,
                "The object that this event is about.",
            ),
            col(
                "Message",
                "string",
                0,
                "A human-readable description of the status of this operation.",
            ),
        ]
    }

    fn cells(&self, o: &Value, now: jiff::Timestamp) -> Vec<Value> {
        let last = [
            s(o, "/lastTimestamp"),
            s(o, "/eventTime"),
            s(o, "/metadata/creationTimestamp"),
        ]
        .into_iter()
        .find(|t| !t.is_empty())
        .unwrap_or_default();
        let kind = s(o, "/involvedObject/kind").to_lowercase();
        vec![
            json!(age(last, now)),
            json!(s(o, "/type")),
            json!(s(o, "/reason")),
            json!(format!("{kind}/{}", s(o, "/involvedObject/name"))),
            json!(s(o, "/message")),
        ]
    }
}
