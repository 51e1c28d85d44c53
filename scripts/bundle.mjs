// Bundle the `breakwater` command: dist/cli.js (tsc's output) and what it imports, Breakwater's
// own modules and its dependencies alike, become one ES module, dist/cli.js, plus the chunks in
// dist/chunks/ that it loads with `await import()` only when a config or command needs them
// (YAML, tracing, the flag file's evaluator, the fleet, the operator commands, the drills).
//
// Why: Node loading a few thousand small files (undici, fastify, prom-client, pino, typebox...)
// keeps more memory than the same code in a few large files; bench/README.md has the figures.
// The rest of dist/ stays tsc's output: the library (`main`), the tests and the schema generator
// use it.
//
// Left outside the bundle, loaded from node_modules: a flagProvider module (the config names
// it, so it is found at run time).
import { readFileSync } from 'node:fs'
import { createRequire, isBuiltin } from 'node:module'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'

export const EXTERNAL = []

/**
 * Node's own modules are reached with require(), never with an ES import. Node's ES import of
 * one of its modules reads every export once, getters included, to make the module's ES face,
 * and some of those getters load more: on Node 24 an `import … from 'node:http'` reads
 * `http.WebSocket` and so loads and compiles Node's copy of undici (fetch, WebSocket) that
 * Breakwater never calls, 13 MiB of idle RSS (bench/README.md). require() hands back the
 * module object itself, and only what the code reads is read.
 */
function builtinsByRequire () {
  return {
    name: 'builtins-by-require',
    setup (build) {
      build.onResolve({ filter: /^[a-z_]/ }, (args) => {
        if (!isBuiltin(args.path) || args.kind === 'require-call') return undefined
        return { path: args.path, namespace: args.kind === 'dynamic-import' ? 'builtin-import' : 'builtin' }
      })
      build.onResolve({ filter: /.*/, namespace: 'builtin' }, (args) => ({ path: args.path, external: true }))
      build.onResolve({ filter: /.*/, namespace: 'builtin-import' }, (args) => ({ path: args.path, external: true }))
      build.onLoad({ filter: /.*/, namespace: 'builtin' }, (args) => ({
        contents: `module.exports = require(${JSON.stringify(args.path)})\n`,
        loader: 'js'
      }))
      // `await import('node:https')` lands in a chunk of its own, where a CommonJS module would
      // expose only `default` (`(await import('node:https')).request` would be undefined): it
      // gets a small ES module that names the module's exports, as Node's own import does, all
      // but its getters (reading Node 24's `http.WebSocket` loads Node's undici; a getter is
      // still there on `default`).
      build.onLoad({ filter: /.*/, namespace: 'builtin-import' }, (args) => {
        const names = plainExports(args.path)
        return {
          contents: `const m = require(${JSON.stringify(args.path)})\nexport default m\nexport const { ${names.join(', ')} } = m\n`,
          loader: 'js'
        }
      })
    }
  }
}

/** The names of a Node module's own exports that are plain values, not getters (this Node's). */
export function plainExports (name) {
  const mod = createRequire(import.meta.url)(name)
  return Object.getOwnPropertyNames(mod).filter((key) => key !== 'default' && /^[A-Za-z_$][\w$]*$/.test(key) && Object.getOwnPropertyDescriptor(mod, key)?.get === undefined)
}


/**
 * `await import('pkg')` of a CommonJS package would, in its own chunk, expose only `default`;
 * such a package is reached through a small ES module that names its exports, as Node's own
 * import of it does. So is a dependency's `await import('./file.js')` of one of its own
 * CommonJS files (OpenTelemetry's machine-id readers).
 */
function lazyPackages (root) {
  const require = createRequire(join(root, 'package.json'))
  return {
    name: 'lazy-packages',
    setup (build) {
      build.onResolve({ filter: /^[^./]/ }, (args) => {
        if (args.kind !== 'dynamic-import' || args.namespace === 'lazy' || EXTERNAL.includes(args.path)) return undefined
        if (isBuiltin(args.path)) return undefined
        return { path: args.path, namespace: 'lazy' }
      })
      build.onResolve({ filter: /^\./ }, (args) => {
        if (args.kind !== 'dynamic-import' || args.namespace !== 'file' || !args.importer.includes('/node_modules/')) return undefined
        return { path: createRequire(args.importer).resolve(args.path), namespace: 'lazy' }
      })
      build.onLoad({ filter: /.*/, namespace: 'lazy' }, async (args) => {
        const mod = await import(pathToFileURL(require.resolve(args.path)).href)
        const names = Object.keys(mod).filter((n) => n !== 'default' && /^[A-Za-z_$][\w$]*$/.test(n))
        return { contents: `import * as m from ${JSON.stringify(args.path)}\nexport const { ${names.join(', ')} } = m\n`, resolveDir: root }
      })
    }
  }
}

/** package.json's `engines.node`, for the banner's message (`>=20.18.1`). */
function engines (root) {
  const range = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).engines?.node
  if (typeof range !== 'string' || !/^[\w.<>=| -]+$/.test(range)) throw new Error(`package.json: engines.node is ${JSON.stringify(range)}; the bundle's banner names it`)
  return range
}

/** The bundler, resolved from the project; null when it is not installed. */
export function bundler (root) {
  try {
    const require = createRequire(join(root, 'package.json'))
    return { path: require.resolve('esbuild'), version: require('esbuild/package.json').version }
  } catch {
    return null
  }
}

/** Bundle `root`/dist/cli.js in place. Resolves to the number of files written. */
export async function bundle (root, esbuildPath) {
  const { build } = await import(pathToFileURL(esbuildPath).href)
  const result = await build({
    absWorkingDir: root,
    entryPoints: { cli: join(root, 'dist', 'cli.js') },
    outdir: join(root, 'dist'),
    allowOverwrite: true,
    chunkNames: 'chunks/[name]-[hash]',
    bundle: true,
    splitting: true,
    format: 'esm',
    platform: 'node',
    target: 'node20',
    // Minified: V8 keeps the source text of every loaded file in the heap for as long as the
    // process runs (to compile functions lazily), and the comments and indentation of the
    // dependencies were a third of it. Class and function names stay as written: log lines and
    // errors show them.
    minify: true,
    keepNames: true,
    external: EXTERNAL,
    plugins: [builtinsByRequire(), lazyPackages(root)],
    // The CommonJS dependencies, and the plugin above, call require() for Node's modules. Every
    // file starts with it (the first one Node evaluates is a chunk, not cli.js): on a Node
    // older than package.json's engines it says so, rather than fail on a missing function.
    banner: { js: `if (typeof process.getBuiltinModule !== 'function') { process.stderr.write('breakwater: needs Node.js ${engines(root)}; this is ' + process.version + '\\n'); process.exit(1) }\nconst require = process.getBuiltinModule('node:module').createRequire(import.meta.url);` },
    metafile: true,
    logLevel: 'warning'
  })
  const outputs = Object.keys(result.metafile.outputs)
  for (const file of outputs) {
    const wide = wideCharacter(readFileSync(join(root, file), 'utf8'))
    if (wide !== null) throw new Error(`${file} holds ${wide}: V8 would keep its source in two bytes per character`)
  }
  return outputs.length
}

/**
 * V8 stores a source text in one byte per character when every character is Latin-1, and in
 * two otherwise: one character past U+00FF (a typographic quote in a comment esbuild keeps)
 * doubled the 3 MB of the main chunk in the heap. esbuild escapes what is not ASCII in code
 * (its default charset); what it copies verbatim (license comments) is checked here.
 * The first character of `text` past U+00FF, described, or null.
 */
export function wideCharacter (text) {
  const at = text.search(/[^\u0000-\u00ff]/)
  if (at === -1) return null
  return `U+${text.codePointAt(at).toString(16).toUpperCase().padStart(4, '0')} at offset ${at} (${JSON.stringify(text.slice(Math.max(0, at - 30), at + 10))})`
}
