//! Plain-text tables that fit the terminal, and short ages ("5s", "3m", "2h", "4d").

use std::time::SystemTime;

/// Width of the terminal on stdout, if it is one.
fn terminal_width() -> Option<usize> {
    if let Some((terminal_size::Width(w), _)) = terminal_size::terminal_size() {
        return Some(w as usize);
    }
    std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok())
}

/// Renders rows under a header, columns separated by three spaces. When the
/// table is wider than the terminal, the last column is shortened with `…`;
/// piped output is never cut.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    render_width(header, rows, terminal_width())
}

/// `render` for a given width.
pub fn render_width(header: &[&str], rows: &[Vec<String>], width: Option<usize>) -> String {
    let columns = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let all = std::iter::once(header.iter().map(|h| h.to_string()).collect::<Vec<_>>())
        .chain(rows.iter().cloned());
    for row in all {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate().take(columns) {
            if i + 1 == columns {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        let line = line.trim_end().to_string();
        match width {
            Some(width) if line.chars().count() > width && width > 1 => {
                let cut: String = line.chars().take(width - 1).collect();
                out.push_str(&cut);
                out.push('…');
            }
            _ => out.push_str(&line),
        }
        out.push('\n');
    }
    out
}

/// How long ago `time` was, in the largest whole unit.
pub fn age(time: Option<SystemTime>) -> String {
    let Some(time) = time else { return "-".into() };
    let seconds = SystemTime::now()
        .duration_since(time)
        .unwrap_or_default()
        .as_secs();
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_and_fits() {
        let rows = vec![vec![
            "gw-1".to_string(),
            "True".to_string(),
            "a long last column".to_string(),
        ]];
        let text = render_width(&["NAME", "READY", "VERSIONS"], &rows, None);
        assert_eq!(
            text,
            "NAME   READY   VERSIONS\ngw-1   True    a long last column\n"
        );
        let narrow = render_width(&["NAME", "READY", "VERSIONS"], &rows, Some(20));
        assert!(narrow.lines().all(|l| l.chars().count() <= 20), "{narrow}");
        assert!(narrow.lines().nth(1).unwrap().ends_with('…'));
    }

    #[test]
    fn ages() {
        use std::time::Duration;
        let now = SystemTime::now();
        assert_eq!(age(Some(now - Duration::from_secs(5))), "5s");
        assert_eq!(age(Some(now - Duration::from_secs(600))), "10m");
        assert_eq!(age(Some(now - Duration::from_secs(3 * 86400))), "3d");
        assert_eq!(age(None), "-");
    }
}
