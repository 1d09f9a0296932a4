//! Ingest: where what clients send is kept. Device messages go to the store (a group-commit
//! writer over the registry, or a cluster's JetStream stream) and are acknowledged once
//! committed; services' commands go to the command queue through its single writer.

use crate::commands::Commands;
use crate::store::Store;

/// The store and the command queue; clone freely.
#[derive(Debug, Clone)]
pub(crate) struct Ingest {
    store: Store,
    commands: Commands,
}

impl Ingest {
    /// Ingest into `store` and `commands`.
    pub(crate) fn new(store: Store, commands: Commands) -> Self {
        Self { store, commands }
    }

    /// Device messages.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Services' commands.
    pub(crate) fn commands(&self) -> &Commands {
        &self.commands
    }
}
