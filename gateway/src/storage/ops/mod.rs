//! The storage operations written once over [`super::backend::Backend`]:
//! each implements a part of the storage trait for every engine, from the
//! shared statements ([`super::sql`]) and rows ([`super::rows`]). The trait
//! parts and their types stay in the files above, which import none of this.

pub mod accounts;
pub mod cluster;
pub mod lifecycle;
pub mod orders;
pub mod outbox;
