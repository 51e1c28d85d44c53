// Summaries over rounds and the markdown tables printed at the end of a run.
import { median, min, max, sum, spreadPct } from './stats.mjs'

const dash = '–'

export function fmtInt (v) {
  return v === null || v === undefined ? dash : Math.round(v).toLocaleString('en-US')
}

/** Milliseconds with about 3-4 significant digits. */
export function fmtMs (v) {
  if (v === null || v === undefined) return dash
  const a = Math.abs(v)
  if (a >= 100) return v.toFixed(0)
  if (a >= 10) return v.toFixed(1)
  return v.toFixed(3)
}

export function fmtSignedMs (v) {
  if (v === null || v === undefined) return dash
  return (v >= 0 ? '+' : '') + fmtMs(v)
}

export function fmtFixed (v, digits = 1) {
  return v === null || v === undefined ? dash : v.toFixed(digits)
}

export function fmtRatio (v) {
  return v === null || v === undefined ? dash : v.toFixed(2)
}

const mib = (kib) => (kib === null || kib === undefined ? null : kib / 1024)

function table (head, align, rows) {
  const out = [`| ${head.join(' | ')} |`, `|${align.map((a) => (a === 'r' ? '---:' : '---')).join('|')}|`]
  for (const r of rows) out.push(`| ${r.join(' | ')} |`)
  return out.join('\n')
}

/** Per-round ratio a/b over rounds where both were measured; median and range. */
function perRoundRatio (rowsA, rowsB, key, invert = false) {
  const ratios = []
  const rounds = []
  for (const a of rowsA) {
    const b = rowsB.find((x) => x.round === a.round)
    if (!b || !a[key] || !b[key]) continue
    ratios.push(invert ? b[key] / a[key] : a[key] / b[key])
    rounds.push(a.round)
  }
  return { ratios, rounds, median: median(ratios), min: min(ratios), max: max(ratios) }
}

function perRoundDelta (rowsA, rowsB, key) {
  const deltas = []
  for (const a of rowsA) {
    const b = rowsB.find((x) => x.round === a.round)
    if (!b || a[key] == null || b[key] == null) continue
    deltas.push(a[key] - b[key])
  }
  return { deltas, median: median(deltas), min: min(deltas), max: max(deltas) }
}

/**
 * Summarise one load scenario.
 * results: array of { target, round, ...measurement } (ok runs only)
 */
export function summariseLoad (scenario, targets, results) {
  const by = (t) => results.filter((r) => r.target === t && !r.error)
  const direct = by('direct')
  const fastify = by('fastify-http-proxy')
  const rows = []
  for (const t of targets) {
    const rs = by(t.name)
    const row = { target: t.name, status: t.status, rounds: rs.length }
    if (rs.length > 0) {
      const col = (k) => rs.map((r) => r[k])
      Object.assign(row, {
        reqPerSec: median(col('reqPerSec')),
        reqPerSecMin: min(col('reqPerSec')),
        reqPerSecMax: max(col('reqPerSec')),
        reqPerSecSpreadPct: spreadPct(col('reqPerSec')),
        p50: median(col('p50')),
        p99: median(col('p99')),
        p999: median(col('p999')),
        p999Min: min(col('p999')),
        p999Max: max(col('p999')),
        maxWorst: max(col('max')),
        over1s: sum(col('over1s')),
        rampSMax: max(col('rampS')),
        afterRampP999: median(rs.map((r) => r.afterRamp?.p999)),
        afterRampMaxWorst: max(rs.map((r) => r.afterRamp?.max)),
        afterRampOver1s: sum(rs.map((r) => r.afterRamp?.over1s)),
        loadgenDelayMax: max(col('loadgenDelayMax')),
        errors: sum(col('errors')) + sum(col('timeouts')),
        non2xx: sum(col('non2xx')),
        proxyCpuPct: median(col('proxyCpuPct')),
        cpuUsPerReq: median(col('cpuUsPerReq')),
        cpuUsPerReqMin: min(col('cpuUsPerReq')),
        cpuUsPerReqMax: max(col('cpuUsPerReq')),
        cpu0BusyPct: median(col('cpu0BusyPct')),
        cpu1BusyPct: median(col('cpu1BusyPct')),
        rssKiBLast: rs[rs.length - 1].rssKiB ?? null,
        otherCpuPctMax: max(col('otherCpuPct')),
        repeatedRuns: sum(rs.map((r) => (r.attempts > 1 ? 1 : 0))),
        xDirect: t.name === 'direct' ? perRoundRatio(rs, rs, 'reqPerSec') : perRoundRatio(rs, direct, 'reqPerSec'),
        xFastify: perRoundRatio(rs, fastify, 'reqPerSec'),
        cpuVsFastify: perRoundRatio(rs, fastify, 'cpuUsPerReq'),
        addedP50: t.name === 'direct' ? null : perRoundDelta(rs, direct, 'p50'),
        addedP99: t.name === 'direct' ? null : perRoundDelta(rs, direct, 'p99'),
        addedP999: t.name === 'direct' ? null : perRoundDelta(rs, direct, 'p999')
      })
    }
    rows.push(row)
  }
  return { scenario: scenario.name, rows }
}

export function summariseMemory (targets, results) {
  const rows = []
  for (const t of targets) {
    if (t.name === 'direct') continue
    const rs = results.filter((r) => r.target === t.name && !r.error)
    const row = { target: t.name, status: t.status, rounds: rs.length }
    if (rs.length > 0) {
      const col = (k) => rs.map((r) => r[k])
      Object.assign(row, {
        rssIdleKiB: median(col('rssIdleKiB')),
        rssHoldKiB: median(col('rssHoldKiB')),
        rssHoldKiBMin: min(col('rssHoldKiB')),
        rssHoldKiBMax: max(col('rssHoldKiB')),
        rssAfterKiB: median(col('rssAfterKiB')),
        fdsHold: median(col('fdsHold')),
        acceptedHold: median(col('acceptedHold')),
        connectS: median(col('connectS')),
        listenOverflows: median(col('listenOverflows')),
        reqPerSec: median(col('reqPerSec')),
        errors: sum(col('errors')) + sum(col('timeouts')),
        non2xx: sum(col('non2xx')),
        otherCpuPctMax: max(col('otherCpuPct'))
      })
    }
    rows.push(row)
  }
  return { scenario: 'memory', rows }
}

/** One row per target; `cells(row, isDirect)` gives the cells after the target's name. */
function targetTable (summary, head, align, cells) {
  const rows = summary.rows.map((r) => r.rounds
    ? [r.target, ...cells(r, r.target === 'direct')]
    : [r.target, notRun(r), ...Array(head.length - 2).fill(dash)])
  return table(head, align, rows)
}

const rangeStr = (r, f) => (r && r.median !== null ? `${f(r.median)} (${f(r.min)} to ${f(r.max)})` : dash)
const notRun = (row) => row.status && row.status !== 'ok' ? row.status : 'no successful run'

export function throughputTable (summary) {
  const head = ['target', 'req/s (median)', 'req/s min–max', '×direct', '×fastify-http-proxy', 'p50 ms', 'p99 ms', 'p99.9 ms',
    'errors / non-2xx', 'proxy CPU %', 'proxy CPU µs/req', 'CPU0 busy %', 'RSS MiB after', 'other CPU % (max)']
  const align = ['l', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r']
  return targetTable(summary, head, align, (r, isDirect) => [
    fmtInt(r.reqPerSec),
    `${fmtInt(r.reqPerSecMin)}–${fmtInt(r.reqPerSecMax)}`,
    fmtRatio(r.xDirect.median),
    fmtRatio(r.xFastify.median),
    fmtMs(r.p50),
    fmtMs(r.p99),
    fmtMs(r.p999),
    `${r.errors} / ${r.non2xx}`,
    isDirect ? dash : fmtInt(r.proxyCpuPct),
    isDirect ? dash : fmtFixed(r.cpuUsPerReq),
    fmtInt(r.cpu0BusyPct),
    isDirect ? dash : fmtFixed(r.rssKiBLast === null ? null : r.rssKiBLast / 1024),
    fmtInt(r.otherCpuPctMax)
  ])
}

/** Per-round ratios of each target against fastify-http-proxy (req/s and CPU µs/req). */
export function ratioTable (summary, rounds) {
  const head = ['target ÷ fastify-http-proxy', ...Array.from({ length: rounds }, (_, i) => `round ${i + 1}`), 'median']
  const align = ['l', ...Array(rounds + 1).fill('r')]
  const rows = []
  for (const r of summary.rows) {
    if (!r.rounds || r.target === 'fastify-http-proxy' || r.target === 'direct') continue
    for (const [label, ratio] of [['req/s', r.xFastify], ['CPU µs/req', r.cpuVsFastify]]) {
      if (!ratio || ratio.ratios.length === 0) continue
      const cells = Array.from({ length: rounds }, (_, i) => {
        const j = ratio.rounds.indexOf(i)
        return j < 0 ? dash : fmtRatio(ratio.ratios[j])
      })
      rows.push([`${r.target} (${label})`, ...cells, `**${fmtRatio(ratio.median)}**`])
    }
  }
  return rows.length ? table(head, align, rows) : ''
}

export function addedLatencyTable (summary) {
  const head = ['target', 'achieved req/s', 'p50 ms', 'p99 ms', 'p99.9 ms', 'added p50 ms (min to max)', 'added p99 ms (min to max)',
    'errors / non-2xx', 'proxy CPU %', 'proxy CPU µs/req', 'other CPU % (max)']
  const align = ['l', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r']
  return targetTable(summary, head, align, (r, isDirect) => [
    fmtInt(r.reqPerSec),
    fmtMs(r.p50),
    fmtMs(r.p99),
    fmtMs(r.p999),
    isDirect ? dash : rangeStr(r.addedP50, fmtSignedMs),
    isDirect ? dash : rangeStr(r.addedP99, fmtSignedMs),
    `${r.errors} / ${r.non2xx}`,
    isDirect ? dash : fmtInt(r.proxyCpuPct),
    isDirect ? dash : fmtFixed(r.cpuUsPerReq),
    fmtInt(r.otherCpuPctMax)
  ])
}

const tailMet = (p999, over1s, errors) => (p999 !== null && p999 <= 100 && over1s === 0 && errors === 0 ? 'yes' : 'no')

/**
 * c200: the tail of a closed loop at 200 connections; the goal is p99.9 <= 100 ms and no
 * response over 1 s, over the whole run and after the connection ramp.
 */
export function tailTable (summary) {
  const head = ['target', 'req/s (median)', 'p50 ms', 'p99 ms', 'p99.9 ms', 'p99.9 ms min–max', 'max ms (worst round)', 'responses over 1 s (all rounds)',
    'ramp s (worst)', 'after the ramp: p99.9 ms', 'after the ramp: max ms (worst)', 'p99.9 ≤ 100 ms, none over 1 s: whole run / after the ramp',
    'errors / non-2xx', 'proxy CPU µs/req', 'CPU0 busy %', 'load generator loop delay max ms', 'other CPU % (max)']
  const align = ['l', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'l', 'r', 'r', 'r', 'r', 'r']
  return targetTable(summary, head, align, (r, isDirect) => [
    fmtInt(r.reqPerSec),
    fmtMs(r.p50),
    fmtMs(r.p99),
    `**${fmtMs(r.p999)}**`,
    `${fmtMs(r.p999Min)}–${fmtMs(r.p999Max)}`,
    fmtMs(r.maxWorst),
    `**${fmtInt(r.over1s)}**`,
    fmtFixed(r.rampSMax, 2),
    fmtMs(r.afterRampP999),
    fmtMs(r.afterRampMaxWorst),
    `${tailMet(r.p999, r.over1s, r.errors)} / ${tailMet(r.afterRampP999, r.afterRampOver1s, r.errors)}`,
    `${r.errors} / ${r.non2xx}`,
    isDirect ? dash : fmtFixed(r.cpuUsPerReq),
    fmtInt(r.cpu0BusyPct),
    fmtInt(r.loadgenDelayMax),
    fmtInt(r.otherCpuPctMax)
  ])
}

export function memoryTable (summary) {
  const head = ['target', 'RSS MiB idle (fresh process)', 'RSS MiB holding connections', 'min–max', 'RSS MiB after', 'client connections accepted', 's until all accepted', 'listen overflows', 'open fds', 'req/s', 'errors / non-2xx', 'other CPU % (max)']
  const align = ['l', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r']
  const rows = summary.rows.map((r) => {
    if (!r.rounds) return [r.target, notRun(r), ...Array(head.length - 2).fill(dash)]
    return [
      r.target,
      fmtFixed(mib(r.rssIdleKiB)),
      `**${fmtFixed(mib(r.rssHoldKiB))}**`,
      `${fmtFixed(mib(r.rssHoldKiBMin))}–${fmtFixed(mib(r.rssHoldKiBMax))}`,
      fmtFixed(mib(r.rssAfterKiB)),
      fmtInt(r.acceptedHold),
      fmtFixed(r.connectS),
      fmtInt(r.listenOverflows),
      fmtInt(r.fdsHold),
      fmtInt(r.reqPerSec),
      `${r.errors} / ${r.non2xx}`,
      fmtInt(r.otherCpuPctMax)
    ]
  })
  return table(head, align, rows)
}

export function machineTable (machine) {
  const rows = Object.entries(machine).map(([k, v]) => [k, String(v)])
  return table(['item', 'value'], ['l', 'l'], rows)
}
