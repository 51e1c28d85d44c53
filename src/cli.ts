#!/usr/bin/env node
/**
 * The `breakwater` command (SPEC §1): `start`, `validate`, `--help`, `--version`.
 * Options may come before or after positional arguments.
 */
import { parseArgs } from 'node:util'
import { readFileSync, existsSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { dirname, join } from 'node:path'

const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..')

function version (): string {
  return (JSON.parse(readFileSync(join(packageRoot, 'package.json'), 'utf8')) as { version: string }).version
}

const HELP = `breakwater — a sidecar proxy that makes outages short

Usage:
  breakwater start    [--config PATH]   run the sidecar
  breakwater validate [--config PATH]   check a config file; exit 1 with one line per problem

Operator commands (talk to a running sidecar's admin API):
  breakwater status                                   flags, circuits, active mitigations, incidents
  breakwater kill FLAG --reason TEXT [--ttl 30m] [--fleet]   switch a feature off (kill switch)
  breakwater restore FLAG --reason TEXT [--fleet]      drop the override: back to the configured value
  breakwater circuit UPSTREAM open|closed|auto --reason TEXT [--ttl 30m] [--fleet]
                                                      --fleet: every sidecar of the service (etcd)
  breakwater mitigate killSwitch|circuitBreak|rollback [FLAGS|UPSTREAMS...] --reason TEXT
  breakwater failover UPSTREAM [--to OTHER] --reason TEXT [--ttl 30m] [--fleet]
                                                      send an upstream's traffic to its failover
  breakwater mitigate rateLimit --route ROUTE --rps N [--burst B] --reason TEXT [--ttl 10m]
                                                      shed a traffic spike on a route (429 beyond it)
  breakwater lift MITIGATION_ID --reason TEXT         undo what a mitigation changed (a fleet
                                                      failover's id lifts it on every sidecar)
  breakwater audit [--limit N]                        newest audit entries
  breakwater triage                                   what is wrong, and the lowest-risk fix
  breakwater incident report INCIDENT_ID              post-mortem draft (Markdown; --json for tools)

  breakwater drill [--no-restore] [--json]            rehearse an outage end to end, on loopback
                                                      (--no-restore: the rollback does not fix it → escalation;
                                                      --json: the result as one JSON document)
  breakwater drill --fleet [N] [--json]               the same for a fleet of N sidecars (default 20)
                                                      on etcd and Alertmanager (both installed locally)

Options:
  -c, --config PATH   config file (.yaml, .yml, .json, .mjs); default $BREAKWATER_CONFIG,
                      else ./config/breakwater.yaml, else the embedded default
  -h, --help          show this help
  -v, --version       print the version
  --admin URL         admin API of the sidecar (repeat to act on several); default from the
                      config's listen.admin, else http://127.0.0.1:14000
  --token-file PATH   admin token file; default $BREAKWATER_ADMIN_TOKEN, else the config's
                      admin.tokenFile, else STATEDIR/admin.token
  -r, --reason TEXT   why (required by every command that changes something)
  --ttl DURATION      kill, circuit, failover, mitigate rateLimit: lapse on its own after it
  --to UPSTREAM       failover: where the traffic goes (default: the configured failover)
  --route ROUTE       mitigate rateLimit: the route (repeat for several); --rps N, --burst B
  --json              print only JSON
  --timeout DURATION  how long to wait for each sidecar's answer (default 5s, 10s with --fleet)

Ports (defaults): proxy 14001, ops 14020 (/health /ready /live /metrics), admin 14000.
Signals: SIGTERM drains and stops (exit 0); SIGHUP reloads the config.
`

function configPath (given: string | undefined): string {
  if (given !== undefined && given !== '') return given
  const fromEnv = process.env.BREAKWATER_CONFIG
  if (fromEnv !== undefined && fromEnv !== '') return fromEnv
  if (existsSync('config/breakwater.yaml')) return 'config/breakwater.yaml'
  return join(packageRoot, 'config', 'breakwater.yaml')
}

/** A usage error: the message on stderr, exit 2 (README: "a word the command does not take"). */
function usage (message: string): number {
  process.stderr.write(`breakwater: ${message}\nRun "breakwater --help" for usage.\n`)
  return 2
}

/**
 * `validate bad.yaml` reads like "validate bad.yaml", so running on another file instead (the
 * default config) would pass a CI step that checks nothing: the file is named by --config only.
 */
function fileWord (command: string, words: string[]): string {
  return `${command} takes no file name (got "${words.join(' ')}"): give the config with --config PATH`
}

/** What every operator command takes: where the sidecar is, its token, and the output format. */
const OPERATOR = ['admin', 'token-file', 'config', 'json', 'timeout'] as const

/**
 * The options each command takes (`--help` and `--version` go with any). An option a command
 * does not take is refused (exit 2), never ignored: `mitigate killSwitch F --ttl 2s` read as a
 * permanent kill, or `mitigate killSwitch --route checkout` as "kill every flag", would widen or
 * prolong the mitigation the operator asked for. `mitigate` is keyed by its action.
 */
const TAKES: Record<string, readonly string[]> = {
  start: ['config'],
  validate: ['config', 'json'],
  drill: ['fleet', 'no-restore', 'json'],
  'drill --fleet': ['fleet', 'json'],
  status: OPERATOR,
  triage: OPERATOR,
  incident: OPERATOR,
  audit: [...OPERATOR, 'limit'],
  kill: [...OPERATOR, 'reason', 'ttl', 'fleet'],
  restore: [...OPERATOR, 'reason', 'fleet'],
  circuit: [...OPERATOR, 'reason', 'ttl', 'fleet'],
  failover: [...OPERATOR, 'reason', 'ttl', 'fleet', 'to'],
  'mitigate killSwitch': [...OPERATOR, 'reason'],
  'mitigate circuitBreak': [...OPERATOR, 'reason'],
  'mitigate rollback': [...OPERATOR, 'reason'],
  'mitigate rateLimit': [...OPERATOR, 'reason', 'route', 'rps', 'burst', 'ttl'],
  lift: [...OPERATOR, 'reason']
}

/** What to do instead, where the option belongs to a neighbouring command. */
const INSTEAD: Record<string, string> = {
  fleet: '--fleet applies to kill, restore, circuit, failover',
  'mitigate killSwitch --ttl': 'a kill that lapses on its own is "breakwater kill FLAG --ttl D"',
  'mitigate killSwitch --route': 'name the flags as words: "mitigate killSwitch FLAG..."; --route is for mitigate rateLimit',
  'mitigate circuitBreak --ttl': 'a forced circuit that lapses on its own is "breakwater circuit UPSTREAM open --ttl D"',
  'restore --ttl': 'restore drops the override now; a kill that lapses on its own is "breakwater kill FLAG --ttl D"'
}

/**
 * The command as `TAKES` names it, or null when the words do not name one yet (an unknown
 * command or `mitigate` action, which has its own usage message).
 */
function commandKey (positionals: string[], fleet: boolean): string | null {
  const [command, action] = positionals
  if (command === 'drill') return fleet ? 'drill --fleet' : 'drill'
  if (command === 'mitigate') return TAKES[`mitigate ${action ?? ''}`] !== undefined ? `mitigate ${action as string}` : null
  return command !== undefined && TAKES[command] !== undefined ? command : null
}

/** The first option given that the command does not take, as a usage message; null when all fit. */
function foreignOption (key: string, given: Array<{ name: string, rawName: string }>): string | null {
  const takes = TAKES[key] as readonly string[]
  const foreign = given.find((o) => o.name !== 'help' && o.name !== 'version' && !takes.includes(o.name))
  if (foreign === undefined) return null
  const option = `--${foreign.name}`
  const instead = INSTEAD[`${key} ${option}`] ?? INSTEAD[foreign.name]
  const its = takes.length === 0 ? 'it takes no option' : `its options: ${takes.map((o) => `--${o}`).join(', ')}`
  return `${foreign.rawName === option ? option : `${foreign.rawName} (${option})`} is not an option of "${key}" (${instead ?? its})`
}

async function main (argv: string[]): Promise<number> {
  let parsed
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      tokens: true,
      options: {
        config: { type: 'string', short: 'c' },
        help: { type: 'boolean', short: 'h' },
        version: { type: 'boolean', short: 'v' },
        json: { type: 'boolean' },
        fleet: { type: 'boolean' },
        reason: { type: 'string', short: 'r' },
        ttl: { type: 'string' },
        limit: { type: 'string' },
        to: { type: 'string' },
        route: { type: 'string', multiple: true },
        rps: { type: 'string' },
        burst: { type: 'string' },
        admin: { type: 'string', multiple: true },
        'token-file': { type: 'string' },
        timeout: { type: 'string' },
        'no-restore': { type: 'boolean' }
      }
    })
  } catch (err) {
    process.stderr.write(`breakwater: ${(err as Error).message}\nRun "breakwater --help" for usage.\n`)
    return 2
  }
  const { values, positionals, tokens } = parsed
  if (values.version === true) { process.stdout.write(`${version()}\n`); return 0 }
  const command = positionals[0]
  if (values.help === true || command === undefined || command === 'help') { process.stdout.write(HELP); return 0 }
  const key = commandKey(positionals, values.fleet === true)
  if (key !== null) {
    const foreign = foreignOption(key, tokens.filter((t) => t.kind === 'option'))
    if (foreign !== null) return usage(foreign)
  }

  switch (command) {
    case 'start': {
      if (positionals.length > 1) return usage(fileWord(command, positionals.slice(1)))
      const { start } = await import('./main.js')
      return await start(configPath(values.config))
    }
    case 'validate':
      if (positionals.length > 1) return usage(fileWord(command, positionals.slice(1)))
      return await validate(configPath(values.config), values.json === true)
    case 'drill': {
      const fleet = values.fleet === true
      const json = values.json === true
      // --json: the report is the drill's result as one JSON document, and nothing else.
      const out = json ? () => {} : write
      const signal = AbortSignal.any([stdoutGone.signal, interruptible()])
      if (positionals.length > (fleet ? 2 : 1)) return usage(`unexpected "${positionals.slice(fleet ? 2 : 1).join(' ')}"; usage: breakwater drill [--no-restore] [--json], or drill --fleet [N] [--json]`)
      if (fleet) {
        const n = Number(positionals[1] ?? '20')
        if (!Number.isInteger(n) || n < 1 || n > 200) return usage('drill --fleet N: N is a number of sidecars from 1 to 200')
        const { runFleetDrill } = await import('./drill-fleet.js')
        try {
          // This very command times the fleet kill switch from a new `breakwater kill --fleet`.
          const command = { argv: [process.execPath, process.argv[1] ?? ''], env: process.env }
          const r = await runFleetDrill({ out, sidecars: n, command, signal })
          if (json) write(JSON.stringify(r, null, 2) + '\n')
          return r.failures.length === 0 ? 0 : 1
        } catch (err) {
          if (signal.aborted) return 1
          process.stderr.write(`breakwater: fleet drill failed: ${(err as Error).message}\n`)
          return 1
        }
      }
      const { runDrill } = await import('./drill.js')
      const restore = values['no-restore'] !== true
      let result
      try {
        result = await runDrill({ out, tty: !json && process.stdout.isTTY === true, restore, signal })
      } catch (err) {
        if (signal.aborted) return 1
        throw err
      }
      if (json) write(JSON.stringify(result, null, 2) + '\n')
      // The escalation rehearsal succeeds when the incident was escalated.
      return (restore ? result.restored : result.escalatedSeconds !== null) ? 0 : 1
    }
    case 'status': case 'kill': case 'restore': case 'circuit': case 'failover': case 'mitigate': case 'lift': case 'audit': case 'triage': case 'incident': {
      const { runOperator, UsageError } = await import('./operator/commands.js')
      const given = values.config ?? process.env.BREAKWATER_CONFIG
      try {
        return await runOperator({
          command,
          positionals: positionals.slice(1),
          reason: values.reason,
          ttl: values.ttl,
          limit: values.limit,
          to: values.to,
          route: values.route,
          rps: values.rps,
          burst: values.burst,
          json: values.json === true,
          admin: values.admin ?? [],
          tokenFile: values['token-file'],
          fleet: values.fleet === true,
          timeout: values.timeout,
          configPath: given !== undefined && given !== '' ? given : existsSync('config/breakwater.yaml') ? 'config/breakwater.yaml' : null,
          env: process.env
        }, { out: (t) => process.stdout.write(t), err: (t) => process.stderr.write(t) })
      } catch (err) {
        if (err instanceof UsageError) {
          process.stderr.write(`breakwater: ${err.message}\n`)
          return 2
        }
        throw err
      }
    }
    default:
      process.stderr.write(`breakwater: unknown command "${command}"\nRun "breakwater --help" for usage.\n`)
      return 2
  }
}

async function validate (path: string, json: boolean): Promise<number> {
  // Loaded here, not at the top: an operator command never needs the config compiler.
  const { ConfigError } = await import('./config/load.js')
  const { loadCheckedConfig } = await import('./flags/check.js')
  try {
    const checked = await loadCheckedConfig(path)
    const { config } = checked
    const warnings = [...checked.warnings]
    // What start checks with the environment it is given: said, not refused, since validate may
    // run where the secrets are not (CI).
    const { isLoopback, resolveAdminToken } = await import('./control/token.js')
    const envToken = (process.env.BREAKWATER_ADMIN_TOKEN ?? '').trim() !== ''
    if (!isLoopback(config.listen.admin.host) && config.admin.tokenFile === null && !envToken) {
      warnings.push(`listen.admin: ${config.listen.admin.host} is not a loopback address; start refuses it unless BREAKWATER_ADMIN_TOKEN (not set here) or admin.tokenFile gives a token`)
    }
    if (config.admin.tokenFile !== null && !envToken) {
      // Read as start reads it (a file mounted from a secret may not be here: said, not refused).
      await resolveAdminToken(undefined, config.admin.tokenFile, config.stateDir).catch((err: Error) => {
        warnings.push(`${err.message}; start refuses it unless BREAKWATER_ADMIN_TOKEN is set`)
      })
    }
    if (json) {
      process.stdout.write(JSON.stringify({ valid: true, config: path, warnings }) + '\n')
    } else {
      for (const w of warnings) process.stderr.write(`warning: ${w}\n`)
      process.stdout.write(`${path}: valid — service ${config.service} ${config.version}, ${Object.keys(config.upstreams).length} upstream(s), ${config.routes.length} route(s)\n`)
    }
    return 0
  } catch (err) {
    const problems = err instanceof ConfigError ? err.problems : [(err as Error).message]
    if (json) process.stdout.write(JSON.stringify({ valid: false, config: path, problems }) + '\n')
    else process.stderr.write(problems.map((p) => `${p}\n`).join(''))
    return 1
  }
}

/**
 * A reader that goes away (`breakwater drill | head -1`) is nobody's error: Node ignores SIGPIPE,
 * so the next write fails with EPIPE, which unhandled would end the process with a stack trace.
 * Instead the command stops quietly — a drill closes what it started — and exits 141, as a
 * command ended by SIGPIPE does (what `set -o pipefail` expects of `yes | head -1`).
 */
const stdoutGone = new AbortController()
let stdoutExitCode: number | null = null
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (stdoutGone.signal.aborted) return
  if (err.code !== 'EPIPE') process.stderr.write(`breakwater: cannot write to stdout: ${err.message}\n`)
  stdoutExitCode = err.code === 'EPIPE' ? 141 : 1
  stdoutGone.abort()
})

/**
 * Ctrl-C (SIGINT) or SIGTERM during a drill: Node's default would end the process at once and
 * leave the drill's state dir (its lock, state and audit log) behind. The first signal aborts the
 * drill instead, which closes what it started and exits 128 + the signal's number, as a command
 * ended by it does; a second one ends the process at once.
 */
function interruptible (): AbortSignal {
  const interrupted = new AbortController()
  const on = (name: 'SIGINT' | 'SIGTERM', code: number): void => {
    process.on(name, () => {
      if (interrupted.signal.aborted) process.exit(code)
      process.stderr.write(`breakwater: ${name === 'SIGINT' ? 'interrupted' : 'terminated'}; closing what the drill started\n`)
      signalExitCode = code
      interrupted.abort()
    })
  }
  on('SIGINT', 130)
  on('SIGTERM', 143)
  return interrupted.signal
}
let signalExitCode: number | null = null

/** Text on stdout, until its reader has gone. */
function write (text: string): void {
  if (!stdoutGone.signal.aborted) process.stdout.write(text)
}

main(process.argv.slice(2)).then((code) => {
  process.exitCode = stdoutExitCode ?? signalExitCode ?? code
}, (err: unknown) => {
  process.stderr.write(`breakwater: ${(err as Error).stack ?? String(err)}\n`)
  process.exitCode = 1
})
