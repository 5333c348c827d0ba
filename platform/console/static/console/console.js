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
    var history = [];
    var keys = {};  // project id -> {secret, expiresAt}
    var running = null;

    ["temperature", "top_p"].forEach(function (id) {
      field(id).addEventListener("input", function () {
        field(id + "-value").textContent = field(id).value;
        renderSnippets();
      });
    });
    ["endpoint", "system", "max_tokens", "seed"].forEach(function (id) {
      field(id).addEventListener("input", renderSnippets);
    });

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

    function pyString(s) { return JSON.stringify(s); }

    function renderSnippets() {
      var p = params();
      var msgs = messages(history.length ? [] : [{ role: "user", content: "Hello!" }]);
      var py = [
        "from openai import OpenAI",
        "import os",
        "",
        'client = OpenAI(base_url="' + baseUrl + '", api_key=os.environ["MANTLE_API_KEY"])',
        "stream = client.chat.completions.create(",
        "    model=" + pyString(p.model) + ",",
        "    messages=[",
      ];
      msgs.forEach(function (m) {
        py.push('        {"role": ' + pyString(m.role) + ', "content": ' + pyString(m.content) + "},");
      });
      py.push("    ],");
      py.push("    temperature=" + p.temperature + ",");
      py.push("    top_p=" + p.top_p + ",");
      if (p.max_tokens) py.push("    max_tokens=" + p.max_tokens + ",");
      if (p.seed !== undefined) py.push("    seed=" + p.seed + ",");
      py.push("    stream=True,", ")", "for chunk in stream:",
        '    print(chunk.choices[0].delta.content or "", end="", flush=True)');
      var body = Object.assign({}, p, { messages: msgs, stream: true });
      var json = JSON.stringify(body).replace(/'/g, "'\\''");
      var curl = "curl " + baseUrl + "/chat/completions \\\n" +
        '  -H "Authorization: Bearer $MANTLE_API_KEY" \\\n' +
        '  -H "Content-Type: application/json" \\\n' +
        "  -d '" + json + "'";
      document.querySelector("#snippet-python code").textContent = py.join("\n");
      document.querySelector("#snippet-curl code").textContent = curl;
    }

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

    function readStream(response, target, onDone) {
      var reader = response.body.getReader();
      var decoder = new TextDecoder();
      var buffer = "";
      var text = "";
      var usage = null;
      var finish = null;
      function pump() {
        return reader.read().then(function (step) {
          if (step.done) return onDone(text, usage, finish);
          buffer += decoder.decode(step.value, { stream: true });
          var events = buffer.split("\n\n");
          buffer = events.pop();
          events.forEach(function (event) {
            var line = event.trim();
            if (line.indexOf("data: ") !== 0) return;
            var payload = line.slice(6);
            if (payload === "[DONE]") return;
            var chunk = JSON.parse(payload);
            if (chunk.error) throw new Error(chunk.error.message);
            if (chunk.usage) usage = chunk.usage;
            (chunk.choices || []).forEach(function (choice) {
              if (choice.delta && choice.delta.content) {
                text += choice.delta.content;
                target.textContent = text;
                transcript.scrollTop = transcript.scrollHeight;
              }
              if (choice.finish_reason) finish = choice.finish_reason;
            });
          });
          return pump();
        });
      }
      return pump();
    }

    function setRunning(controller) {
      running = controller;
      sendButton.disabled = !!controller || !canRun;
      stopButton.hidden = !controller;
    }

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var content = input.value.trim();
      if (!content || running || !canRun) return;
      var userMessage = { role: "user", content: content };
      bubble("user", content);
      input.value = "";
      var target = bubble("assistant", "");
      target.parentNode.setAttribute("data-streaming", "1");
      var controller = new AbortController();
      setRunning(controller);
      status.textContent = "Waiting for the first token…";
      var started = performance.now();
      var body = Object.assign(params(), {
        messages: messages([userMessage]),
        stream: true,
        stream_options: { include_usage: true },
      });
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
            throw new Error((err.error && err.error.message) || ("HTTP " + response.status));
          });
        }
        status.textContent = "Streaming…";
        return readStream(response, target, function (text, usage, finish) {
          history.push(userMessage, { role: "assistant", content: text });
          var seconds = ((performance.now() - started) / 1000).toFixed(1);
          status.textContent = "Done in " + seconds + " s · " +
            (usage ? usage.prompt_tokens + " prompt + " + usage.completion_tokens + " completion tokens" : "") +
            (finish ? " · finish: " + finish : "") + (requestId ? " · request " + requestId : "");
          target.parentNode.setAttribute("data-done", "1");
          renderSnippets();
        });
      }).catch(function (error) {
        if (error.name === "AbortError") {
          status.textContent = "Stopped.";
        } else {
          target.parentNode.className = "msg error";
          target.textContent = error.message;
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
      transcript.innerHTML = "";
      status.textContent = "";
      renderSnippets();
    });
    renderSnippets();
  }

  document.addEventListener("DOMContentLoaded", function () {
    var root = document.getElementById("playground");
    if (root) initPlayground(root);
  });
})();
