//! [`Storage`] (merchants, machines, service accounts and presence), written
//! once for every [`Backend`].

use chrono::{DateTime, Utc};
use vendgate_proto::machine::MachineNo;

use crate::secrets::SecretHash;
use crate::storage::backend::Backend;
use crate::storage::rows::{
    from_ms, now_ms, opt_ms, presence_epoch, MachineRow, MerchantRow, ServiceRow,
};
use crate::storage::run::{Inserts, Run, Stmt, Transaction};
use crate::storage::{
    sql, Machine, Merchant, NewMachine, NewMerchant, NewService, PresenceWrite, ServiceAccount,
    Storage, StorageError,
};

/// One presence write on `conn`, with the epoch rule of
/// [`Storage::record_presence`].
pub(crate) async fn write_presence(
    conn: &mut impl Run,
    w: &PresenceWrite,
) -> Result<(), StorageError> {
    conn.execute(
        Stmt::new(sql::presence(w.online))
            .bind(w.machine_no.as_str())
            .bind(presence_epoch(w)?)
            .bind(w.at.timestamp_millis()),
    )
    .await?;
    Ok(())
}

/// Run `update` on merchant `appid`'s row, then drop the cached copy: this
/// process sees the change at once, others within the cache's TTL. True if
/// there was such a merchant.
pub(crate) async fn update_merchant<B: Backend>(
    b: &B,
    appid: &str,
    update: Stmt<'_>,
) -> Result<bool, StorageError> {
    let n = b.pooled().execute(update).await?;
    b.merchants().forget(appid);
    Ok(n == 1)
}

#[async_trait::async_trait]
impl<B: Backend> Storage for B {
    async fn create_merchant(&self, m: NewMerchant) -> Result<Merchant, StorageError> {
        let created_at_ms = now_ms();
        let insert = Stmt::new(sql::INSERT_MERCHANT)
            .bind(&m.appid)
            .bind(&m.name)
            .bind(&m.notify_url)
            .bind(m.appsecret_hash.as_str())
            .bind(&m.appsecret_enc)
            .bind(created_at_ms)
            .inserting(Inserts::Account("merchant"));
        self.pooled().execute(insert).await?;
        let created_at = from_ms(created_at_ms, "merchants.created_at_ms")?;
        Ok(Merchant::created(m, created_at))
    }

    async fn merchant(&self, appid: &str) -> Result<Option<Merchant>, StorageError> {
        let load = async {
            self.pooled()
                .fetch_optional::<MerchantRow>(Stmt::new(sql::MERCHANT).bind(appid))
                .await?
                .map(MerchantRow::into_merchant)
                .transpose()
        };
        self.merchants().get_or_load(appid, load).await
    }

    async fn set_notify_url(&self, appid: &str, url: Option<&str>) -> Result<bool, StorageError> {
        update_merchant(
            self,
            appid,
            Stmt::new(sql::SET_NOTIFY_URL).bind(url).bind(appid),
        )
        .await
    }

    async fn list_merchants(&self) -> Result<Vec<Merchant>, StorageError> {
        self.pooled()
            .fetch_all::<MerchantRow>(Stmt::new(sql::MERCHANTS))
            .await?
            .into_iter()
            .map(MerchantRow::into_merchant)
            .collect()
    }

    async fn create_machine(&self, m: NewMachine) -> Result<Machine, StorageError> {
        let created_at_ms = now_ms();
        let insert = Stmt::new(sql::INSERT_MACHINE)
            .bind(m.machine_no.as_str())
            .bind(&m.merchant_appid)
            .bind(m.secret_hash.as_str())
            .bind(created_at_ms)
            .inserting(Inserts::Account("machine"));
        self.pooled().execute(insert).await?;
        let created_at = from_ms(created_at_ms, "machines.created_at_ms")?;
        Ok(Machine::created(m, created_at))
    }

    async fn create_machines(&self, ms: Vec<NewMachine>) -> Result<(), StorageError> {
        self.insert_machines(ms).await
    }

    async fn machine(&self, m: &MachineNo) -> Result<Option<Machine>, StorageError> {
        self.pooled()
            .fetch_optional::<MachineRow>(Stmt::new(sql::MACHINE).bind(m.as_str()))
            .await?
            .map(MachineRow::into_machine)
            .transpose()
    }

    async fn rotate_machine_secret(
        &self,
        m: &MachineNo,
        new_hash: &SecretHash,
        previous_until: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError> {
        let rotate = Stmt::new(sql::ROTATE_MACHINE_SECRET)
            .bind(new_hash.as_str())
            .bind(opt_ms(previous_until))
            .bind(m.as_str());
        Ok(self.pooled().execute(rotate).await? == 1)
    }

    async fn rotate_merchant_secret(
        &self,
        appid: &str,
        new_hash: &SecretHash,
        new_enc: &str,
        previous_until: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError> {
        let rotate = Stmt::new(sql::ROTATE_MERCHANT_SECRET)
            .bind(new_hash.as_str())
            .bind(opt_ms(previous_until))
            .bind(new_enc)
            .bind(appid);
        update_merchant(self, appid, rotate).await
    }

    async fn list_machines(&self, merchant: Option<&str>) -> Result<Vec<Machine>, StorageError> {
        let list = match merchant {
            Some(appid) => Stmt::new(sql::MACHINES_OF_MERCHANT).bind(appid),
            None => Stmt::new(sql::MACHINES),
        };
        self.pooled()
            .fetch_all::<MachineRow>(list)
            .await?
            .into_iter()
            .map(MachineRow::into_machine)
            .collect()
    }

    async fn create_service(&self, s: NewService) -> Result<ServiceAccount, StorageError> {
        let created_at_ms = now_ms();
        let insert = Stmt::new(sql::INSERT_SERVICE)
            .bind(&s.username)
            .bind(&s.name)
            .bind(s.password_hash.as_str())
            .bind(created_at_ms)
            .inserting(Inserts::Account("service"));
        self.pooled().execute(insert).await?;
        let created_at = from_ms(created_at_ms, "services.created_at_ms")?;
        Ok(ServiceAccount::created(s, created_at))
    }

    async fn service(&self, username: &str) -> Result<Option<ServiceAccount>, StorageError> {
        self.pooled()
            .fetch_optional::<ServiceRow>(Stmt::new(sql::SERVICE).bind(username))
            .await?
            .map(ServiceRow::into_service)
            .transpose()
    }

    async fn record_presence(
        &self,
        m: &MachineNo,
        online: bool,
        epoch: u64,
        at: DateTime<Utc>,
    ) -> Result<(), StorageError> {
        self.record_one_presence(PresenceWrite {
            machine_no: *m,
            online,
            epoch,
            at,
        })
        .await
    }

    async fn record_presence_batch(&self, batch: &[PresenceWrite]) -> Result<(), StorageError> {
        // One transaction (one commit) for the whole batch: a reconnect storm
        // of 10,000 machines is a handful of commits, not 10,000.
        let mut tx = self.begin(false).await?;
        for w in Self::lock_order(batch, |w| &w.machine_no).iter() {
            write_presence(&mut tx, w).await?;
        }
        tx.commit().await
    }

    async fn reset_presence(&self) -> Result<(), StorageError> {
        self.pooled()
            .execute(Stmt::new(sql::RESET_PRESENCE))
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StorageError> {
        self.check_ready().await
    }

    async fn close(&self) {
        self.shut_down().await;
    }
}
