//! Text tables in the style of LunaCM's listings.

/// Columns padded to their widest cell, a `=` rule under the header.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut out = vec![
        line(headers.iter().map(|h| h.to_string()).collect()),
        line(widths.iter().map(|w| "=".repeat(*w)).collect()),
    ];
    out.extend(rows.iter().map(|row| line(row.clone())));
    out.join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_pads_and_rules() {
        let text = super::table(
            &["Slot #", "Status"],
            &[
                vec!["0".into(), "alive".into()],
                vec!["12345678".into(), "down".into()],
            ],
        );
        assert_eq!(
            text,
            "Slot #    Status\n========  ======\n0         alive\n12345678  down"
        );
    }
}
