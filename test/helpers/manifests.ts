/**
 * Check Kubernetes manifests against the Kubernetes API schema, strictly.
 *
 * Two checks, because each misses what the other finds:
 * - `kubernetes-models`' `validate()` (the API's OpenAPI schema compiled to validators):
 *   wrong types, enum values, formats — but it accepts any unknown field.
 * - The same package's TypeScript declarations: every object is compiled as a literal of its
 *   kind's type: the compiler reports wrong types and missing required fields, and a walk of
 *   each object against its type reports every field the type does not have, at any depth
 *   (`readynessProbe`, `containerport`). Kinds outside the core API
 *   (PodMonitor, Kustomization) are compiled against ./custom-resources.ts.
 */
import { join } from 'node:path'
import ts from 'typescript'
import { Deployment } from 'kubernetes-models/apps/v1/Deployment'
import { ConfigMap } from 'kubernetes-models/v1/ConfigMap'
import { Service } from 'kubernetes-models/v1/Service'
import { ROOT } from './root.js'

export interface Manifest {
  /** Where it came from, for messages: `deployment.yaml#0`. */
  source: string
  object: unknown
}

interface Kind {
  /** The TypeScript type and the module that declares it. */
  type: string
  from: string
  /** The API schema validator, for core kinds. */
  validate?: (object: unknown) => void
}

const custom = './helpers/custom-resources'

const KINDS: Record<string, Kind> = {
  'apps/v1 Deployment': { type: 'IDeployment', from: 'kubernetes-models/apps/v1/Deployment', validate: (o) => { new Deployment(o as never).validate() } },
  'v1 Service': { type: 'IService', from: 'kubernetes-models/v1/Service', validate: (o) => { new Service(o as never).validate() } },
  'v1 ConfigMap': { type: 'IConfigMap', from: 'kubernetes-models/v1/ConfigMap', validate: (o) => { new ConfigMap(o as never).validate() } },
  'monitoring.coreos.com/v1 PodMonitor': { type: 'PodMonitor', from: custom },
  'kustomize.config.k8s.io/v1beta1 Kustomization': { type: 'Kustomization', from: custom }
}

function kindOf (object: unknown): string {
  const o = (object ?? {}) as { apiVersion?: unknown, kind?: unknown }
  return `${String(o.apiVersion)} ${String(o.kind)}`
}

/** Every problem of every manifest, each prefixed with its source; empty when all are valid. */
export function schemaProblems (manifests: Manifest[]): string[] {
  const problems: string[] = []
  const typed: Array<Manifest & { kind: Kind }> = []
  for (const m of manifests) {
    const kind = KINDS[kindOf(m.object)]
    if (kind === undefined) {
      problems.push(`${m.source}: no schema for ${kindOf(m.object)}`)
      continue
    }
    typed.push({ ...m, kind })
    try {
      kind.validate?.(m.object)
    } catch (err) {
      problems.push(`${m.source}: ${(err as Error).message}`)
    }
  }
  problems.push(...typeProblems(typed))
  return problems
}

/**
 * Compile `const m0: IDeployment = {...}` for each manifest in memory. Type errors come from
 * the compiler; unknown fields from a walk of each object against its declared type, which
 * (unlike the compiler, which stops at the first error of an initializer) finds every one.
 */
function typeProblems (manifests: Array<Manifest & { kind: Kind }>): string[] {
  if (manifests.length === 0) return []
  const fileName = join(ROOT, 'test', '__manifests__.ts')
  const imports = new Map<string, Set<string>>()
  for (const { kind } of manifests) imports.set(kind.from, (imports.get(kind.from) ?? new Set()).add(kind.type))
  let text = [...imports].map(([from, types]) => `import type { ${[...types].join(', ')} } from '${from}'\n`).join('')
  const spans: Array<{ start: number, end: number, source: string }> = []
  manifests.forEach((m, i) => {
    const start = text.length
    text += `export const m${i}: ${m.kind.type} = ${JSON.stringify(m.object, null, 1)}\n`
    spans.push({ start, end: text.length, source: m.source })
  })

  const options: ts.CompilerOptions = {
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.ESNext,
    moduleResolution: ts.ModuleResolutionKind.Bundler,
    lib: ['lib.es2022.d.ts'],
    types: []
  }
  const host = ts.createCompilerHost(options)
  const getSourceFile = host.getSourceFile.bind(host)
  host.getSourceFile = (name, languageVersion, ...rest) =>
    name === fileName ? ts.createSourceFile(name, text, languageVersion, true) : getSourceFile(name, languageVersion, ...rest)
  const fileExists = host.fileExists.bind(host)
  host.fileExists = (name) => name === fileName || fileExists(name)
  const readFile = host.readFile.bind(host)
  host.readFile = (name) => name === fileName ? text : readFile(name)

  const program = ts.createProgram([fileName], options, host)
  const checker = program.getTypeChecker()
  const sourceFile = program.getSourceFile(fileName)
  if (sourceFile === undefined) return ['the manifest program has no source file']
  const problems: string[] = []

  const declarations = sourceFile.statements.filter(ts.isVariableStatement).map((s) => s.declarationList.declarations[0])
  declarations.forEach((declaration, i) => {
    const manifest = manifests[i]
    if (declaration?.type === undefined || manifest === undefined) return
    walk(checker, checker.getTypeFromTypeNode(declaration.type), manifest.object, '', (path, message) => problems.push(`${manifest.source} at ${path}: ${message}`))
  })

  const diagnostics = [...program.getSyntacticDiagnostics(), ...program.getSemanticDiagnostics(), ...program.getGlobalDiagnostics()]
  for (const d of diagnostics) {
    if (EXCESS_PROPERTY.has(d.code)) continue // the walk has reported every one of them
    const message = ts.flattenDiagnosticMessageText(d.messageText, ' ')
    const start = d.start
    if (d.file?.fileName !== fileName || start === undefined) {
      problems.push(`${d.file?.fileName ?? 'compiler'}: ${message}`)
      continue
    }
    const span = spans.find((s) => start >= s.start && start < s.end)
    problems.push(`${span?.source ?? 'imports'} at ${fieldPath(sourceFile, start)}: ${message}`)
  }
  return problems
}

/** "Object literal may only specify known properties" (2353), and its "Did you mean" form (2561). */
const EXCESS_PROPERTY = new Set([2353, 2561])

/** Report every field of `value` that `type` does not declare, at any depth. */
function walk (checker: ts.TypeChecker, type: ts.Type, value: unknown, path: string, report: (path: string, message: string) => void): void {
  if (value === null || typeof value !== 'object') return
  const members = (type.isUnion() ? type.types : [type]).map((m) => checker.getNonNullableType(m))
  if (Array.isArray(value)) {
    const arrays = members.filter((m) => checker.isArrayType(m))
    const element = arrays.map((a) => checker.getIndexTypeOfType(a, ts.IndexKind.Number)).find((e) => e !== undefined)
    if (element !== undefined) value.forEach((v, i) => { walk(checker, element, v, `${path}[${i}]`, report) })
    return
  }
  const objects = members.filter((m) => (m.flags & ts.TypeFlags.Object) !== 0 && !checker.isArrayType(m))
  if (objects.length === 0) return
  for (const [key, v] of Object.entries(value)) {
    const at = path === '' ? key : `${path}.${key}`
    const property = objects.map((o) => checker.getPropertyOfType(o, key)).find((p) => p !== undefined)
    if (property !== undefined) {
      walk(checker, checker.getNonNullableType(checker.getTypeOfSymbol(property)), v, at, report)
      continue
    }
    const index = objects.map((o) => checker.getIndexInfoOfType(o, ts.IndexKind.String)).find((x) => x !== undefined)
    if (index !== undefined) {
      walk(checker, index.type, v, at, report)
      continue
    }
    report(at, `unknown field "${key}": ${checker.typeToString(objects[0] as ts.Type)} has no such field`)
  }
}

/** `spec.template.spec.initContainers[0].ports[0].containerPort` for the node at `position`. */
function fieldPath (sourceFile: ts.SourceFile, position: number): string {
  let node: ts.Node = sourceFile
  for (;;) {
    const child: ts.Node | undefined = node.getChildren(sourceFile).find((c) => c.getStart(sourceFile) <= position && position < c.getEnd())
    if (child === undefined) break
    node = child
  }
  const parts: string[] = []
  for (let n: ts.Node | undefined = node; n !== undefined && !ts.isVariableDeclaration(n); n = n.parent) {
    if (ts.isPropertyAssignment(n)) parts.unshift(`.${n.name.getText(sourceFile).replace(/^"(.*)"$/, '$1')}`)
    else if (n.parent !== undefined && ts.isArrayLiteralExpression(n.parent)) parts.unshift(`[${n.parent.elements.indexOf(n as ts.Expression)}]`)
  }
  return parts.join('').replace(/^\./, '') || '(top)'
}
