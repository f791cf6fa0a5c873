//! The control plane: the long-lived ractor actors under the root
//! supervisor (registry, ACL, TOFU, metrics, mesh) and where to find them. Actors
//! carry control messages only, never packets (DESIGN.md §2.1).

pub mod acl;
pub mod mesh;
pub mod metrics;
pub mod registry;
pub mod supervisor;
pub mod tofu;
pub mod verify;

use std::sync::{Arc, RwLock};

use ractor::ActorRef;

use crate::admission::UrlVerdict;
use crate::conn::{Registered, Registrar};
use crate::routing::ClientHandle;
use acl::AclMsg;
use mesh::MeshMsg;
use metrics::MetricsMsg;
use registry::RegistryMsg;
use tofu::TofuMsg;

/// Where to find a long-lived actor that may be restarted: read on the control
/// path (never per packet), swapped by the supervisor.
pub struct ActorSlot<M: ractor::Message>(RwLock<Option<ActorRef<M>>>);

impl<M: ractor::Message> Default for ActorSlot<M> {
    fn default() -> Self {
        ActorSlot(RwLock::new(None))
    }
}

impl<M: ractor::Message> ActorSlot<M> {
    pub fn get(&self) -> Option<ActorRef<M>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, r: Option<ActorRef<M>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = r;
    }
}

/// The current long-lived actors; a restart swaps in the new one.
#[derive(Default)]
pub struct Actors {
    pub registry: ActorSlot<RegistryMsg>,
    pub tofu: ActorSlot<TofuMsg>,
    pub acl: ActorSlot<AclMsg>,
    pub metrics: ActorSlot<MetricsMsg>,
    pub mesh: ActorSlot<MeshMsg>,
}

/// Connections register through the registry actor, its single writer.
impl Registrar for Actors {
    fn register(&self, h: Arc<ClientHandle>, url: UrlVerdict) -> Registered {
        let reg = self.registry.get();
        Box::pin(async move {
            let reg = reg.ok_or("registry is not running")?;
            ractor::call_t!(reg, RegistryMsg::Register, 5_000, h, url).map_err(|e| e.to_string())
        })
    }

    fn deregister(&self, h: Arc<ClientHandle>) {
        if let Some(reg) = self.registry.get() {
            let _ = reg.cast(RegistryMsg::Deregister(h));
        }
    }

    fn activity(&self, h: Arc<ClientHandle>) {
        if let Some(reg) = self.registry.get() {
            let _ = reg.cast(RegistryMsg::Activity(h));
        }
    }

    fn watch(&self, h: Arc<ClientHandle>) {
        if let Some(reg) = self.registry.get() {
            let _ = reg.cast(RegistryMsg::Watch(h));
        }
    }
}
