//! Per-machine stock as last reported by the machine, and the quantities held
//! by open orders: `free = stock − reserved`. Reservation is all-or-nothing
//! per order and happens under the machine's entry lock, so two orders can
//! never both take the last item.

use std::collections::HashMap;

use dashmap::DashMap;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::InventoryItem;

use crate::domain::order::Line;

#[derive(Debug, Default, Clone)]
struct MachineStock {
    /// product_id → (stock, unit price in fen), from the latest snapshot.
    items: HashMap<i64, (u32, i64)>,
    /// product_id → quantity held by open orders.
    reserved: HashMap<i64, u32>,
}

/// Why a reservation failed (both are 30004 to the merchant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortfall {
    NotCarried(i64),
    Insufficient(i64),
}

/// One product's figures for `GET /machines`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StockView {
    pub product_id: i64,
    pub stock: u32,
    pub reserved: u32,
    pub price: i64,
}

#[derive(Debug, Default)]
pub struct Inventory {
    machines: DashMap<MachineNo, MachineStock>,
}

impl Inventory {
    /// Replace the machine's snapshot (reservations are kept: they belong to
    /// orders, not to the snapshot).
    pub fn set_snapshot(&self, m: MachineNo, items: &[InventoryItem]) {
        let mut e = self.machines.entry(m).or_default();
        e.items = items
            .iter()
            .map(|i| (i.product_id, (i.stock, i.price)))
            .collect();
    }

    /// Reserve every line or none. Returns the lines priced from the snapshot.
    pub fn reserve(&self, m: MachineNo, wanted: &[(i64, u32)]) -> Result<Vec<Line>, Shortfall> {
        let mut e = self.machines.entry(m).or_default();
        let mut lines = Vec::with_capacity(wanted.len());
        // Sum repeated product lines before checking.
        let mut totals: HashMap<i64, u32> = HashMap::new();
        for (p, q) in wanted {
            let t = totals.entry(*p).or_default();
            *t = t.saturating_add(*q);
        }
        for (p, q) in &totals {
            let Some((stock, _)) = e.items.get(p) else {
                return Err(Shortfall::NotCarried(*p));
            };
            let held = e.reserved.get(p).copied().unwrap_or(0);
            if stock.saturating_sub(held) < *q {
                return Err(Shortfall::Insufficient(*p));
            }
        }
        for (p, q) in &totals {
            *e.reserved.entry(*p).or_default() += *q;
        }
        for (p, q) in wanted {
            let price = e.items.get(p).map(|(_, price)| *price).unwrap_or(0);
            lines.push(Line {
                product_id: *p,
                quantity: *q,
                dispensed: 0,
                unit_price: price,
            });
        }
        Ok(lines)
    }

    /// Hold stock for an order restored from storage at start-up (no check:
    /// the order already owns it).
    pub fn restore(&self, m: MachineNo, lines: &[Line]) {
        let mut e = self.machines.entry(m).or_default();
        for l in lines {
            *e.reserved.entry(l.product_id).or_default() += l.quantity;
        }
    }

    /// Replace the machine's reservations with those of `lines` (a node
    /// a machine arriving from another node has them rebuilt from its open orders).
    pub fn set_reserved(&self, m: MachineNo, lines: &[Line]) {
        let mut e = self.machines.entry(m).or_default();
        e.reserved.clear();
        for l in lines {
            *e.reserved.entry(l.product_id).or_default() += l.quantity;
        }
    }

    /// Give an order's reservation back. Reported stock is not touched: the
    /// machine publishes a fresh snapshot after every dispense (PROTOCOL.md
    /// rule 5), usually before its result has been applied here, so
    /// subtracting the dispensed count as well would count it twice.
    pub fn release(&self, m: MachineNo, lines: &[Line]) {
        let mut e = self.machines.entry(m).or_default();
        for l in lines {
            if let Some(r) = e.reserved.get_mut(&l.product_id) {
                *r = r.saturating_sub(l.quantity);
                if *r == 0 {
                    e.reserved.remove(&l.product_id);
                }
            }
        }
    }

    pub fn view(&self, m: &MachineNo) -> Vec<StockView> {
        let Some(e) = self.machines.get(m) else {
            return Vec::new();
        };
        let mut v: Vec<StockView> = e
            .items
            .iter()
            .map(|(p, (stock, price))| StockView {
                product_id: *p,
                stock: *stock,
                reserved: e.reserved.get(p).copied().unwrap_or(0),
                price: *price,
            })
            .collect();
        v.sort_by_key(|s| s.product_id);
        v
    }

    /// Total reserved on a machine (tests and metrics).
    pub fn reserved_total(&self, m: &MachineNo) -> u64 {
        self.machines
            .get(m)
            .map(|e| e.reserved.values().map(|v| u64::from(*v)).sum())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv() -> (Inventory, MachineNo) {
        let i = Inventory::default();
        let m: MachineNo = "12345678".parse().unwrap();
        i.set_snapshot(
            m,
            &[InventoryItem {
                product_id: 1,
                stock: 3,
                price: 350,
            }],
        );
        (i, m)
    }

    #[test]
    fn reserve_is_all_or_nothing() {
        let (i, m) = inv();
        assert_eq!(
            i.reserve(m, &[(1, 1), (2, 1)]),
            Err(Shortfall::NotCarried(2))
        );
        assert_eq!(i.reserved_total(&m), 0);
        let l = i.reserve(m, &[(1, 2)]).unwrap();
        assert_eq!(l[0].unit_price, 350);
        assert_eq!(i.reserve(m, &[(1, 2)]), Err(Shortfall::Insufficient(1)));
        assert_eq!(
            i.reserve(m, &[(1, 1), (1, 1)]),
            Err(Shortfall::Insufficient(1)),
            "repeated lines add up"
        );
        i.release(m, &l);
        assert_eq!(i.reserved_total(&m), 0);
    }

    #[test]
    fn snapshot_keeps_reservations() {
        let (i, m) = inv();
        let _l = i.reserve(m, &[(1, 2)]).unwrap();
        i.set_snapshot(
            m,
            &[InventoryItem {
                product_id: 1,
                stock: 10,
                price: 300,
            }],
        );
        assert_eq!(i.view(&m)[0].reserved, 2);
        assert_eq!(i.view(&m)[0].stock, 10);
    }
}
