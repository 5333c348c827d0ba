// The console's small enhancements: every page works without them (forms post, links
// navigate); with them, copy buttons copy, charts draw, and the playground streams.
(function () {
  "use strict";

  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  // --- copy buttons: <button data-copy="#selector"> -----------------------------------------
  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    // Plain-HTTP deployments have no async clipboard API: fall back to a selection.
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "absolute";
    area.style.left = "-9999px";
    document.body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); } finally { document.body.removeChild(area); }
    return Promise.resolve();
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (!button) return;
    var source = document.querySelector(button.getAttribute("data-copy"));
    if (!source) return;
    copyText(source.innerText.trim()).then(function () {
      var label = button.textContent;
      button.textContent = "Copied";
      button.setAttribute("data-copied", "1");
      setTimeout(function () { button.textContent = label; }, 1500);
    });
  });

  // --- selects that submit their form (the organization switcher) ---------------------------
  document.addEventListener("change", function (event) {
    if (event.target.matches("select[data-autosubmit]")) event.target.form.submit();
  });

  // --- charts (Chart.js, vendored) ------------------------------------------------------------
  var charts = [];
  function drawCharts(root) {
    if (typeof window.Chart === "undefined") return;
    charts = charts.filter(function (c) {
      if (!document.body.contains(c.canvas)) { c.destroy(); return false; }
      return true;
    });
    root.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      if (canvas.getAttribute("data-drawn")) return;
      var source = document.getElementById(canvas.getAttribute("data-source"));
      if (!source) return;
      var data = JSON.parse(source.textContent);
      var kind = canvas.getAttribute("data-chart");
      var datasets = kind === "tokens"
        ? [
            { label: "Input tokens", data: data.input, backgroundColor: "#748ffc", stack: "t" },
            { label: "Output tokens", data: data.output, backgroundColor: "#3b5bdb", stack: "t" },
          ]
        : [{ label: "Cost (USD)", data: data.cost, backgroundColor: "#2b8a3e" }];
      charts.push(new window.Chart(canvas, {
        type: "bar",
        data: { labels: data.labels, datasets: datasets },
        options: {
          animation: false,
          responsive: true,
          plugins: { legend: { display: kind === "tokens" } },
          scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } },
        },
      }));
      canvas.setAttribute("data-drawn", "1");
    });
  }
  window.addEventListener("load", function () { drawCharts(document); });
  document.addEventListener("htmx:afterSwap", function (event) { drawCharts(event.target); });

  // --- playground -----------------------------------------------------------------------------
  // Everything the model or the person wrote (answers, tool names, arguments, errors) is put
  // into the page with textContent, never as HTML.

  // A JSON value as a Python literal, for the snippet: JSON's string escapes are Python's.
  function pyLiteral(value, pad) {
    if (value === null || value === undefined) return "None";
    if (value === true) return "True";
    if (value === false) return "False";
    if (typeof value === "number") return String(value);
    if (typeof value === "string") return JSON.stringify(value);
    var inner = pad === undefined ? undefined : pad + "    ";
    var items = Array.isArray(value)
      ? value.map(function (v) { return pyLiteral(v, inner); })
      : Object.keys(value).map(function (k) { return JSON.stringify(k) + ": " + pyLiteral(value[k], inner); });
    var open = Array.isArray(value) ? "[" : "{";
    var close = Array.isArray(value) ? "]" : "}";
    if (!items.length) return open + close;
    if (pad === undefined) return open + items.join(", ") + close;
    return open + "\n" + items.map(function (i) { return inner + i + ",\n"; }).join("") + pad + close;
  }

  // A textarea's JSON schema: {value} or {error} naming the field.
  function jsonObjectOf(element, label) {
    var raw = element.value.trim();
    if (!raw) return { error: label + " is empty: write a JSON schema object, such as {\"type\": \"object\"}." };
    var value;
    try {
      value = JSON.parse(raw);
    } catch (e) {
      return { error: label + " is not valid JSON: " + e.message };
    }
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      return { error: label + " must be a JSON object (a JSON schema), not " + (Array.isArray(value) ? "an array" : JSON.stringify(value)) + "." };
    }
    return { value: value };
  }

  function initPlayground(root) {
    var baseUrl = root.getAttribute("data-base-url");
    var keyUrl = root.getAttribute("data-key-url");
    var canRun = root.getAttribute("data-can-run") === "1";
    var transcript = document.getElementById("transcript");
    var form = document.getElementById("chat-form");
    var input = document.getElementById("message");
    var sendButton = document.getElementById("send");
    var stopButton = document.getElementById("stop");
    var status = document.getElementById("run-status");
    var field = function (id) { return document.getElementById(id); };
    var toolsBox = field("tools");
    var history = [];
    var pendingCalls = [];  // the last answer's tool calls, awaiting results: {id, result}
    var keys = {};  // project id -> {secret, expiresAt}
    var running = null;

    ["temperature", "top_p"].forEach(function (id) {
      field(id).addEventListener("input", function () {
        field(id + "-value").textContent = field(id).value;
        renderSnippets();
      });
    });
    ["endpoint", "system", "max_tokens", "seed", "stream", "tool_choice", "parallel_tool_calls",
      "schema_name", "schema", "schema_strict"].forEach(function (id) {
      field(id).addEventListener("input", renderSnippets);
      field(id).addEventListener("change", renderSnippets);
    });

    // --- tools: one fieldset per function, cloned from the page's <template> ---------------
    function toolCards() { return Array.prototype.slice.call(toolsBox.querySelectorAll("[data-tool]")); }
    function toolInput(card, name) { return card.querySelector('[data-tool-field="' + name + '"]'); }

    function refreshTools() {
      var cards = toolCards();
      cards.forEach(function (card, i) {
        card.querySelector("[data-tool-number]").textContent = String(i + 1);
        ["name", "description", "parameters"].forEach(function (name) {
          var element = toolInput(card, name);
          element.id = "tool-" + i + "-" + name;
          card.querySelector('label[data-for="' + name + '"]').htmlFor = element.id;
        });
      });
      field("tools-count").textContent = String(cards.length);
      var select = field("tool_choice");
      var chosen = select.value;
      select.querySelectorAll("option[data-named]").forEach(function (o) { o.remove(); });
      cards.forEach(function (card) {
        var name = toolInput(card, "name").value.trim();
        if (!name) return;
        var option = document.createElement("option");
        option.value = "function:" + name;
        option.textContent = "function: " + name;
        option.setAttribute("data-named", "1");
        select.appendChild(option);
      });
      var values = Array.prototype.map.call(select.options, function (o) { return o.value; });
      select.value = cards.length && values.indexOf(chosen) >= 0 ? chosen : "auto";
      select.disabled = !cards.length;
      field("parallel_tool_calls").disabled = !cards.length;
      renderSnippets();
    }

    field("add-tool").addEventListener("click", function () {
      toolsBox.appendChild(field("tool-template").content.cloneNode(true));
      refreshTools();
      var cards = toolCards();
      toolInput(cards[cards.length - 1], "name").focus();
    });
    toolsBox.addEventListener("click", function (event) {
      var remove = event.target.closest("[data-remove-tool]");
      if (!remove) return;
      remove.closest("[data-tool]").remove();
      clearFieldErrors();
      refreshTools();
    });
    toolsBox.addEventListener("input", function (event) {
      if (event.target.getAttribute("data-tool-field") === "name") refreshTools();
      else renderSnippets();
    });

    field("response_format").addEventListener("change", function () {
      var format = field("response_format").value;
      field("json-schema-fields").hidden = format !== "json_schema";
      field("format-badge").textContent = format === "text" ? "text" : format === "json_object" ? "JSON mode" : "JSON schema";
      renderSnippets();
    });

    // The tools and response format as the request carries them, and what is wrong with them.
    function agentOptions() {
      var out = {};
      var errors = [];
      var cards = toolCards();
      if (cards.length) {
        out.tools = cards.map(function (card, i) {
          var label = "Function " + (i + 1);
          var fn = { name: toolInput(card, "name").value.trim() };
          if (!fn.name) errors.push({ element: toolInput(card, "name"), message: label + ": the name is required." });
          var description = toolInput(card, "description").value.trim();
          if (description) fn.description = description;
          var parameters = jsonObjectOf(toolInput(card, "parameters"), label + " · Parameters (JSON schema)");
          if (parameters.error) errors.push({ element: toolInput(card, "parameters"), message: parameters.error });
          else fn.parameters = parameters.value;
          return { type: "function", function: fn };
        });
        var choice = field("tool_choice").value;
        out.tool_choice = choice.indexOf("function:") === 0
          ? { type: "function", function: { name: choice.slice("function:".length) } }
          : choice;
        out.parallel_tool_calls = field("parallel_tool_calls").checked;
      }
      var format = field("response_format").value;
      if (format === "json_object") {
        out.response_format = { type: "json_object" };
      } else if (format === "json_schema") {
        var spec = { name: field("schema_name").value.trim() };
        if (!spec.name) errors.push({ element: field("schema_name"), message: "Schema name is required." });
        var schema = jsonObjectOf(field("schema"), "Schema (JSON)");
        if (schema.error) errors.push({ element: field("schema"), message: schema.error });
        else spec.schema = schema.value;
        spec.strict = field("schema_strict").checked;
        out.response_format = { type: "json_schema", json_schema: spec };
      }
      return { options: out, errors: errors };
    }

    // --- errors next to the field they are about -------------------------------------------
    function showFieldError(element, message) {
      var details = element.closest("details");
      if (details) details.open = true;
      var box = element.closest(".field");
      var note = document.createElement("p");
      note.className = "error small field-error";
      note.setAttribute("role", "alert");
      note.textContent = message;
      if (box) {
        box.classList.add("invalid");
        box.appendChild(note);
      } else {
        element.insertAdjacentElement("afterend", note);
      }
      element.setAttribute("aria-invalid", "true");
    }

    function clearFieldErrors() {
      root.querySelectorAll(".field-error").forEach(function (e) { e.remove(); });
      root.querySelectorAll(".field.invalid").forEach(function (e) { e.classList.remove("invalid"); });
      root.querySelectorAll("[aria-invalid]").forEach(function (e) { e.removeAttribute("aria-invalid"); });
    }

    // The control a gateway error's `param` names (pydantic writes tools.0, the checks tools[0]).
    function elementForParam(param) {
      if (!param) return null;
      var p = param.replace(/\.(\d+)(?=\.|$)/g, "[$1]");
      var tool = /^tools\[(\d+)\](?:\.function)?(?:\.(name|description|parameters))?/.exec(p);
      if (tool) {
        var card = toolCards()[parseInt(tool[1], 10)];
        return card ? toolInput(card, tool[2] || "name") : field("add-tool");
      }
      if (/^tools\b/.test(p)) return field("add-tool");
      if (/^tool_choice\b/.test(p)) return field("tool_choice");
      if (/^parallel_tool_calls\b/.test(p)) return field("parallel_tool_calls");
      if (/^response_format\b/.test(p)) {
        if (/\.name$/.test(p)) return field("schema_name");
        if (/\.strict$/.test(p)) return field("schema_strict");
        return field(field("response_format").value === "json_schema" ? "schema" : "response_format");
      }
      var plain = {
        model: "endpoint", temperature: "temperature", top_p: "top_p", max_tokens: "max_tokens",
        max_completion_tokens: "max_tokens", seed: "seed", messages: "message",
      };
      var id = plain[p.split(/[.[]/)[0]];
      return id ? field(id) : null;
    }

    function gatewayError(body, httpStatus) {
      var detail = (body && body.error) || {};
      var error = new Error(detail.message || ("HTTP " + httpStatus));
      error.param = detail.param || null;
      return error;
    }

    // --- the request -------------------------------------------------------------------------
    function params() {
      var out = {
        model: field("endpoint").value,
        temperature: parseFloat(field("temperature").value),
        top_p: parseFloat(field("top_p").value),
        max_tokens: parseInt(field("max_tokens").value, 10) || undefined,
      };
      var seed = field("seed").value;
      if (seed !== "") out.seed = parseInt(seed, 10);
      return out;
    }

    function messages(extra) {
      var list = [];
      var system = field("system").value.trim();
      if (system) list.push({ role: "system", content: system });
      return list.concat(history, extra || []);
    }

    function renderSnippets() {
      var p = params();
      var options = agentOptions().options;  // the snippet shows what is valid so far
      var streamed = field("stream").checked;
      var msgs = messages(history.length ? [] : [{ role: "user", content: "Hello!" }]);
      var py = [
        "from openai import OpenAI",
        "import os",
        "",
        'client = OpenAI(base_url="' + baseUrl + '", api_key=os.environ["MANTLE_API_KEY"])',
        (streamed ? "stream" : "completion") + " = client.chat.completions.create(",
        "    model=" + JSON.stringify(p.model) + ",",
        "    messages=[",
      ];
      msgs.forEach(function (m) { py.push("        " + pyLiteral(m) + ","); });
      py.push("    ],");
      py.push("    temperature=" + p.temperature + ",");
      py.push("    top_p=" + p.top_p + ",");
      if (p.max_tokens) py.push("    max_tokens=" + p.max_tokens + ",");
      if (p.seed !== undefined) py.push("    seed=" + p.seed + ",");
      ["tools", "tool_choice", "parallel_tool_calls", "response_format"].forEach(function (name) {
        if (options[name] !== undefined) py.push("    " + name + "=" + pyLiteral(options[name], "    ") + ",");
      });
      if (streamed) {
        py.push("    stream=True,", ")", "for chunk in stream:",
          "    delta = chunk.choices[0].delta",
          '    print(delta.content or "", end="", flush=True)');
        if (options.tools) {
          py.push("    for call in delta.tool_calls or []:",
            '        print(call.function.name or "", call.function.arguments or "", end="", flush=True)');
        }
      } else {
        py.push(")", "message = completion.choices[0].message",
          "print(message.content)");
        if (options.tools) {
          py.push("for call in message.tool_calls or []:",
            "    print(call.function.name, call.function.arguments)");
        }
      }
      var body = Object.assign({}, p, { messages: msgs }, options, { stream: streamed });
      var json = JSON.stringify(body).replace(/'/g, "'\\''");
      var curl = "curl " + baseUrl + "/chat/completions \\\n" +
        '  -H "Authorization: Bearer $MANTLE_API_KEY" \\\n' +
        '  -H "Content-Type: application/json" \\\n' +
        "  -d '" + json + "'";
      document.querySelector("#snippet-python code").textContent = py.join("\n");
      document.querySelector("#snippet-curl code").textContent = curl;
    }

    // --- the transcript ----------------------------------------------------------------------
    function bubble(role, text) {
      var hint = transcript.querySelector(".hint");
      if (hint) hint.remove();
      var p = document.createElement("div");
      p.className = "msg " + role;
      var who = document.createElement("span");
      who.className = "who";
      who.textContent = role;
      var body = document.createElement("span");
      body.className = "text";
      body.textContent = text;
      p.appendChild(who);
      p.appendChild(body);
      transcript.appendChild(p);
      transcript.scrollTop = transcript.scrollHeight;
      return body;
    }

    // JSON text indented when it parses (arguments and JSON answers), else as it is.
    function pretty(text) {
      try {
        return JSON.stringify(JSON.parse(text), null, 2);
      } catch (e) {
        return null;
      }
    }

    // One assistant answer as it arrives: text, and tool calls assembled by their index.
    function answerIn(target) {
      var message = target.parentNode;
      var answer = { text: "", calls: [] };
      answer.addText = function (piece) {
        answer.text += piece;
        target.textContent = answer.text;
        transcript.scrollTop = transcript.scrollHeight;
      };
      answer.addCall = function (delta) {
        var index = delta.index || 0;
        var call = answer.calls[index];
        if (!call) {
          var box = document.createElement("div");
          box.className = "tool-call";
          var label = document.createElement("span");
          label.className = "tool-label";
          label.textContent = "calls";
          var name = document.createElement("code");
          name.className = "tool-name";
          var args = document.createElement("pre");
          args.className = "tool-args";
          box.appendChild(label);
          box.appendChild(name);
          box.appendChild(args);
          message.appendChild(box);
          call = answer.calls[index] = { id: "", name: "", arguments: "", box: box, nameEl: name, argsEl: args };
        }
        var fn = delta.function || {};
        if (delta.id) call.id = delta.id;
        if (fn.name) {
          call.name = fn.name;
          call.nameEl.textContent = call.name;
        }
        if (fn.arguments) {
          call.arguments += fn.arguments;
          call.argsEl.textContent = call.arguments;
        }
        transcript.scrollTop = transcript.scrollHeight;
      };
      answer.finish = function (json) {
        answer.calls.forEach(function (call) {
          var indented = pretty(call.arguments);
          if (indented !== null) call.argsEl.textContent = indented;
          call.box.setAttribute("data-call-id", call.id);
        });
        if (!answer.text && answer.calls.length) target.hidden = true;
        if (json && answer.text) {
          var indented = pretty(answer.text);
          if (indented !== null) {
            target.textContent = indented;
            target.classList.add("json");
            message.setAttribute("data-json", "1");
          } else {
            message.setAttribute("data-json", "0");
          }
        }
      };
      answer.historyEntry = function () {
        var entry = { role: "assistant", content: answer.text || null };
        if (answer.calls.length) {
          entry.tool_calls = answer.calls.map(function (c) {
            return { id: c.id, type: "function", function: { name: c.name, arguments: c.arguments } };
          });
        }
        return entry;
      };
      return answer;
    }

    // Each call of the last answer gets a result box; the next send returns the results.
    function awaitResults(answer) {
      pendingCalls = answer.calls.map(function (call, i) {
        var label = document.createElement("label");
        label.className = "tool-result";
        label.textContent = "Result of " + call.name;
        var area = document.createElement("textarea");
        area.rows = 2;
        area.id = "tool-result-" + i;
        area.setAttribute("data-tool-result", call.id);
        area.placeholder = '{"temperature": 18}';
        label.appendChild(area);
        call.box.appendChild(label);
        return { id: call.id, name: call.name, area: area, label: label };
      });
      input.required = !pendingCalls.length;
      if (pendingCalls.length) input.placeholder = "Send the results (and a message if you like)…";
    }

    function toolResults() {
      var results = pendingCalls.map(function (call) {
        return { role: "tool", tool_call_id: call.id, content: call.area.value };
      });
      return results;
    }

    function settleResults() {
      pendingCalls.forEach(function (call) {
        call.label.remove();
      });
      pendingCalls = [];
      input.required = true;
      input.placeholder = "Ask something…";
    }

    function sessionKey(project) {
      var found = keys[project];
      if (found && found.expiresAt - Date.now() > 5 * 60 * 1000) return Promise.resolve(found.secret);
      var data = new FormData();
      data.append("project", project);
      return fetch(keyUrl, {
        method: "POST",
        body: data,
        headers: { "X-CSRFToken": csrfToken() },
        credentials: "same-origin",
      }).then(function (response) {
        if (!response.ok) throw new Error("the console refused a playground key (HTTP " + response.status + ")");
        return response.json();
      }).then(function (key) {
        keys[project] = { secret: key.secret, expiresAt: Date.parse(key.expires_at) };
        return key.secret;
      });
    }

    function readStream(response, answer) {
      var reader = response.body.getReader();
      var decoder = new TextDecoder();
      var buffer = "";
      var outcome = { usage: null, finish: null };
      function pump() {
        return reader.read().then(function (step) {
          if (step.done) return outcome;
          buffer += decoder.decode(step.value, { stream: true });
          var events = buffer.split("\n\n");
          buffer = events.pop();
          events.forEach(function (event) {
            var line = event.trim();
            if (line.indexOf("data: ") !== 0) return;
            var payload = line.slice(6);
            if (payload === "[DONE]") return;
            var chunk = JSON.parse(payload);
            if (chunk.error) throw gatewayError(chunk, 200);
            if (chunk.usage) outcome.usage = chunk.usage;
            (chunk.choices || []).forEach(function (choice) {
              var delta = choice.delta || {};
              if (delta.content) answer.addText(delta.content);
              (delta.tool_calls || []).forEach(answer.addCall);
              if (choice.finish_reason) outcome.finish = choice.finish_reason;
            });
          });
          return pump();
        });
      }
      return pump();
    }

    function readWhole(response, answer) {
      return response.json().then(function (completion) {
        var choice = (completion.choices || [])[0] || {};
        var message = choice.message || {};
        if (message.content) answer.addText(message.content);
        (message.tool_calls || []).forEach(function (call, index) {
          answer.addCall({ index: index, id: call.id, function: call.function });
        });
        return { usage: completion.usage || null, finish: choice.finish_reason || null };
      });
    }

    function setRunning(controller) {
      running = controller;
      sendButton.disabled = !!controller || !canRun;
      stopButton.hidden = !controller;
    }

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var content = input.value.trim();
      if ((!content && !pendingCalls.length) || running || !canRun) return;
      clearFieldErrors();
      var agent = agentOptions();
      if (agent.errors.length) {
        agent.errors.forEach(function (e) { showFieldError(e.element, e.message); });
        status.textContent = "Fix the fields marked in red: " + agent.errors.map(function (e) { return e.message; }).join(" ");
        return;
      }
      var turn = toolResults();
      turn.forEach(function (m) { bubble("tool", m.content); });
      if (content) {
        turn.push({ role: "user", content: content });
        bubble("user", content);
      }
      input.value = "";
      var target = bubble("assistant", "");
      var answer = answerIn(target);
      var json = !!agent.options.response_format;
      target.parentNode.setAttribute("data-streaming", "1");
      var controller = new AbortController();
      setRunning(controller);
      var streamed = field("stream").checked;
      status.textContent = streamed ? "Waiting for the first token…" : "Waiting for the answer…";
      var started = performance.now();
      var body = Object.assign(params(), agent.options, { messages: messages(turn), stream: streamed });
      if (streamed) body.stream_options = { include_usage: true };
      var requestId = null;
      sessionKey(field("project").value).then(function (secret) {
        return fetch(baseUrl + "/chat/completions", {
          method: "POST",
          headers: { "Authorization": "Bearer " + secret, "Content-Type": "application/json" },
          body: JSON.stringify(body),
          signal: controller.signal,
        });
      }).then(function (response) {
        requestId = response.headers.get("x-request-id");
        if (!response.ok) {
          return response.json().then(function (err) {
            throw gatewayError(err, response.status);
          }, function () {
            throw gatewayError(null, response.status);
          });
        }
        if (streamed) status.textContent = "Streaming…";
        return (streamed ? readStream(response, answer) : readWhole(response, answer)).then(function (outcome) {
          settleResults();
          history = history.concat(turn, [answer.historyEntry()]);
          answer.finish(json);
          var seconds = ((performance.now() - started) / 1000).toFixed(1);
          var usage = outcome.usage;
          status.textContent = "Done in " + seconds + " s · " +
            (usage ? usage.prompt_tokens + " prompt + " + usage.completion_tokens + " completion tokens" : "") +
            (outcome.finish ? " · finish: " + outcome.finish : "") +
            (answer.calls.length ? " · " + answer.calls.length + " tool call" + (answer.calls.length > 1 ? "s" : "") : "") +
            (json && target.parentNode.getAttribute("data-json") === "0" ? " · the answer is not valid JSON" : "") +
            (requestId ? " · request " + requestId : "");
          target.parentNode.setAttribute("data-done", "1");
          if (answer.calls.length) awaitResults(answer);
          renderSnippets();
        });
      }).catch(function (error) {
        if (error.name === "AbortError") {
          status.textContent = "Stopped.";
        } else {
          if (!input.value) input.value = content;  // to fix and send again
          var message = error.message + (error.param ? " (param: " + error.param + ")" : "");
          target.parentNode.className = "msg error";
          target.hidden = false;
          target.textContent = message;
          if (error.param) target.parentNode.setAttribute("data-param", error.param);
          var element = elementForParam(error.param);
          if (element) showFieldError(element, message);
          status.textContent = "The request failed" + (requestId ? " (request " + requestId + ")" : "") + ".";
        }
      }).finally(function () {
        target.parentNode.removeAttribute("data-streaming");
        setRunning(null);
      });
    });

    input.addEventListener("keydown", function (event) {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
    });
    stopButton.addEventListener("click", function () { if (running) running.abort(); });
    document.getElementById("clear").addEventListener("click", function () {
      history = [];
      settleResults();
      transcript.innerHTML = "";
      status.textContent = "";
      clearFieldErrors();
      renderSnippets();
    });
    refreshTools();
  }
  document.addEventListener("DOMContentLoaded", function () {
    var root = document.getElementById("playground");
    if (root) initPlayground(root);
  });
})();
