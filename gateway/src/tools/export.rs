//! `vendgate export orders`: orders created in a time range, as CSV or JSON
//! lines, for audits. Read in pages of [`PAGE`] orders by (created_at,
//! order_id), each page written out before the next is read, so memory
//! stays bounded whatever the range holds, and an order placed meanwhile
//! never shifts a page.

use std::io::Write;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::json;

use crate::storage::{OrderPage, Storage, StorageError, StoredOrder};

/// Orders read per page.
pub const PAGE: usize = 500;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Csv,
    Jsonl,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("--from must be before --to")]
    EmptyRange,
    #[error("writing the output")]
    Output(#[source] std::io::Error),
    #[error(transparent)]
    Storage(StorageError),
}

const CSV_HEADER: &str = "order_id,merchant_appid,machine_no,out_trade_no,status,amount,\
refund_amount,refunded_amount,refunded_at,error,created_at,updated_at,lines";

/// Write the orders created in `[from, to)` (only `merchant`'s when given)
/// to `out`; returns how many.
pub async fn orders(
    store: &dyn Storage,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    merchant: Option<&str>,
    format: Format,
    out: &mut impl Write,
) -> Result<u64, ExportError> {
    if from >= to {
        return Err(ExportError::EmptyRange);
    }
    if format == Format::Csv {
        writeln!(out, "{CSV_HEADER}").map_err(ExportError::Output)?;
    }
    let mut after = None;
    let mut n = 0;
    loop {
        let page = store
            .export_orders(&OrderPage {
                from,
                to,
                merchant,
                after,
                limit: PAGE,
            })
            .await
            .map_err(ExportError::Storage)?;
        for o in &page {
            match format {
                Format::Csv => writeln!(out, "{}", csv_row(o)),
                Format::Jsonl => writeln!(out, "{}", json_row(o)),
            }
            .map_err(ExportError::Output)?;
        }
        n += page.len() as u64;
        match page.last() {
            Some(last) if page.len() == PAGE => after = Some((last.created_at, last.order_id)),
            _ => break,
        }
        out.flush().map_err(ExportError::Output)?;
    }
    out.flush().map_err(ExportError::Output)?;
    Ok(n)
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn json_row(o: &StoredOrder) -> serde_json::Value {
    json!({
        "order_id": o.order_id.to_string(),
        "merchant_appid": o.merchant_appid,
        "machine_no": o.machine_no.as_str(),
        "out_trade_no": o.out_trade_no,
        "status": o.status.as_str(),
        "amount": o.amount,
        "refund_amount": o.refund_amount,
        "refunded_amount": o.refunded_amount,
        "refunded_at": o.refunded_at.map(time),
        "error": o.error,
        "created_at": time(o.created_at),
        "updated_at": time(o.updated_at),
        "lines": o.lines.iter().map(|l| json!({
            "product_id": l.product_id,
            "quantity": l.quantity,
            "dispensed": l.dispensed,
            "unit_price": l.unit_price,
        })).collect::<Vec<_>>(),
    })
}

fn csv_row(o: &StoredOrder) -> String {
    let lines = o
        .lines
        .iter()
        .map(|l| {
            format!(
                "{}:{}:{}:{}",
                l.product_id, l.quantity, l.dispensed, l.unit_price
            )
        })
        .collect::<Vec<_>>()
        .join(";");
    [
        o.order_id.to_string(),
        csv_text(&o.merchant_appid),
        o.machine_no.to_string(),
        csv_text(o.out_trade_no.as_deref().unwrap_or("")),
        o.status.as_str().to_owned(),
        o.amount.to_string(),
        o.refund_amount.to_string(),
        o.refunded_amount.to_string(),
        o.refunded_at.map(time).unwrap_or_default(),
        csv_text(o.error.as_deref().unwrap_or("")),
        time(o.created_at),
        time(o.updated_at),
        lines,
    ]
    .join(",")
}

/// A text cell: quoted when it holds a separator, quote or line break; a
/// leading `=`, `+`, `-`, `@`, tab or CR (which spreadsheets run as a
/// formula) gets a `'` in front, since these values come from merchants.
fn csv_text(s: &str) -> String {
    let guarded = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if guarded.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", guarded.replace('"', "\"\""))
    } else {
        guarded
    }
}

#[cfg(test)]
mod tests {
    use super::csv_text;

    #[test]
    fn csv_cells_are_quoted_and_formula_safe() {
        assert_eq!(csv_text("plain"), "plain");
        assert_eq!(csv_text("a,b"), "\"a,b\"");
        assert_eq!(csv_text("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_text("=1+1"), "'=1+1");
        assert_eq!(csv_text("@x,y"), "\"'@x,y\"");
    }
}
