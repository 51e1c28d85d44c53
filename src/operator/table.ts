/** A plain text table: a header row, then one row per item, columns padded to fit. */
export function table (header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)))
  const line = (cells: string[]): string => '  ' + cells.map((c, i) => c.padEnd(widths[i] as number)).join('  ').trimEnd()
  return [line(header.map((h) => h.toUpperCase())), ...rows.map(line)].join('\n')
}
